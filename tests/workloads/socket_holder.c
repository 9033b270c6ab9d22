/*
 * socket_holder.c - a process the first engine must refuse to checkpoint: it holds
 * an AF_UNIX socketpair (with data queued in it) and a TCP listening socket on
 * 127.0.0.1. A refused checkpoint must leave it running exactly as before, so
 * after go it checks that its sockets still work:
 *   - the bytes queued before ready are still there, and both directions of the
 *     socketpair carry new data
 *   - the listener is still bound to the same port and accepts a connection that
 *     carries data both ways
 */
#include "wl.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

static const char queued[] = "queued before ready";

static int roundtrip(int a, int b, const char *msg)
{
	char buf[64] = "";
	size_t n = strlen(msg);
	return send(a, msg, n, MSG_NOSIGNAL) == (ssize_t)n && recv(b, buf, sizeof(buf), 0) == (ssize_t)n &&
	       memcmp(buf, msg, n) == 0;
}

static int bound_port(int fd)
{
	struct sockaddr_in sin;
	socklen_t len = sizeof(sin);
	if (getsockname(fd, (struct sockaddr *)&sin, &len) < 0)
		return -1;
	return ntohs(sin.sin_port);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	int sv[2];
	SETUP(socketpair(AF_UNIX, SOCK_STREAM, 0, sv));
	SETUP(send(sv[0], queued, strlen(queued), 0));

	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	SETUP(lfd);
	struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	SETUP(bind(lfd, (struct sockaddr *)&sin, sizeof(sin)));
	SETUP(listen(lfd, 4));
	const int port = bound_port(lfd);

	wl_ready("port=%d\nunix=%d,%d\nlisten=%d\n", port, sv[0], sv[1], lfd);
	wl_wait_go(NULL);

	if (wl_sabotage)
		close(sv[1]);

	char buf[64] = "";
	CHECK(recv(sv[1], buf, sizeof(buf), MSG_DONTWAIT) == (ssize_t)strlen(queued) &&
	      memcmp(buf, queued, strlen(queued)) == 0, "the data queued in the socketpair is gone");
	CHECK(roundtrip(sv[0], sv[1], "ping"), "socketpair: 0 -> 1 failed");
	CHECK(roundtrip(sv[1], sv[0], "pong"), "socketpair: 1 -> 0 failed");

	CHECK_EQ("listening port", bound_port(lfd), port);
	int c = socket(AF_INET, SOCK_STREAM, 0);
	sin.sin_port = htons((uint16_t)port);
	if (c < 0 || connect(c, (struct sockaddr *)&sin, sizeof(sin)) < 0) {
		wl_fail("connect to 127.0.0.1:%d: %s", port, strerror(errno));
	} else {
		int a = accept(lfd, NULL, NULL);
		CHECK(a >= 0 && roundtrip(c, a, "hello") && roundtrip(a, c, "world"),
		      "TCP exchange over an accepted connection failed");
		if (a >= 0)
			close(a);
	}
	if (c >= 0)
		close(c);
	return wl_finish();
}
