/*
 * The pod sandbox's only process ("pause"): it holds the pod's namespaces open while the
 * pod's containers come and go. When the pod shares one PID namespace it is that
 * namespace's PID 1, so it also collects the exit status of orphaned processes (otherwise
 * they stay zombies). SIGINT or SIGTERM end it with status 0; anything else leaves it
 * waiting. Built static (scripts/image.sh) so that the image needs nothing but this file.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig)
{
    (void)sig;
    _exit(0);
}

static void reap(int sig)
{
    int saved = errno;

    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
    errno = saved;
}

static int handle(int sig, void (*handler)(int), int flags)
{
    struct sigaction action;

    memset(&action, 0, sizeof(action));
    action.sa_handler = handler;
    action.sa_flags = flags;
    sigemptyset(&action.sa_mask);
    return sigaction(sig, &action, NULL);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        puts("pause (cache-appliance e2e)");
        return 0;
    }
    /* As PID 1 a signal without a handler is ignored, so every one we act on has one. */
    if (handle(SIGINT, stop, 0) || handle(SIGTERM, stop, 0)
        || handle(SIGCHLD, reap, SA_NOCLDSTOP | SA_RESTART)) {
        perror("pause: sigaction");
        return 1;
    }
    if (getpid() != 1)
        fputs("pause: not PID 1 of its namespace; orphans are not ours to reap\n", stderr);
    for (;;)
        pause();
}
