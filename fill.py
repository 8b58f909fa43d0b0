import socket
import sys

s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
val = b"x" * 100
N = 1_000_000
batch = []
for i in range(N):
    batch.append(b"set key:%010d 0 0 100 noreply\r\n%s\r\n" % (i, val))
    if len(batch) == 1000:
        s.sendall(b"".join(batch))
        batch = []
s.sendall(b"version\r\n")
print(s.recv(100))
