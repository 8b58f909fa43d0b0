from cacheserver.cli import main

main()
