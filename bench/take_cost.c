/*
 * What a cross-worker take costs beside opening a new connection, in
 * microseconds on this machine (the system calls only, no nginx):
 *
 *   take: pidfd_open() of the owner, pidfd_getfd() of its descriptor,
 *         close() of the pidfd, fstat() (the inode check), epoll_ctl(ADD)
 *         and, when the connection goes, close();
 *   new:  socket(), a nonblocking connect() to a loopback listener,
 *         epoll_ctl(ADD), epoll_wait() until it is writable, getsockopt
 *         (SO_ERROR), as ngx_event_connect_peer() and nginx's connect
 *         test do, and close(); the listener accepts and closes in a
 *         child process (a real backend does more: Apache hands the
 *         connection to a child).
 *
 *   gcc -O2 -o /tmp/take_cost bench/take_cost.c && /tmp/take_cost [N]
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 20000;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = { .sin_family = AF_INET };
    socklen_t len = sizeof(sin);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *) &sin, sizeof(sin)) || listen(ls, 4096)
        || getsockname(ls, (struct sockaddr *) &sin, &len))
    {
        perror("listen");
        return 1;
    }

    /* The "owner": a process holding one connected socket as fd 100. */
    int pipefd[2];
    if (pipe(pipefd)) {
        return 1;
    }
    pid_t owner = fork();
    if (owner == 0) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *) &sin, sizeof(sin))) {
            _exit(1);
        }
        dup2(s, 100);
        if (write(pipefd[1], "x", 1) != 1) {
            _exit(1);
        }
        pause();
        _exit(0);
    }
    char c;
    if (read(pipefd[0], &c, 1) != 1) {
        return 1;
    }
    int held = accept(ls, NULL, NULL);

    /* The listener's side for the new connections. */
    pid_t acceptor = fork();
    if (acceptor == 0) {
        for (;;) {
            int a = accept(ls, NULL, NULL);
            if (a >= 0) {
                close(a);
            }
        }
    }

    int ep = epoll_create1(0);
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLET | EPOLLRDHUP };

    double t0 = now();
    for (int i = 0; i < n; i++) {
        int pidfd = syscall(SYS_pidfd_open, owner, 0);
        int fd = syscall(SYS_pidfd_getfd, pidfd, 100, 0);
        close(pidfd);
        struct stat st;
        if (fd < 0 || fstat(fd, &st)) {
            perror("pidfd_getfd");
            return 1;
        }
        ev.data.fd = fd;
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        close(fd);
    }
    double take = (now() - t0) / n;

    struct epoll_event out;
    t0 = now();
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (connect(s, (struct sockaddr *) &sin, sizeof(sin)) && errno != EINPROGRESS) {
            perror("connect");
            return 1;
        }
        ev.data.fd = s;
        epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
        while (epoll_wait(ep, &out, 1, 1000) == 1 && out.data.fd != s) {
        }
        int err = 0;
        socklen_t el = sizeof(err);
        getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el);
        close(s);
    }
    double fresh = (now() - t0) / n;

    printf("cross-worker take: %.2f us, new loopback connection: %.2f us (%d each)\n",
           take, fresh, n);
    kill(owner, SIGKILL);
    kill(acceptor, SIGKILL);
    waitpid(owner, NULL, 0);
    waitpid(acceptor, NULL, 0);
    close(held);
    return 0;
}
