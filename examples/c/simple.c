/*
 * natter from C: the seed's example on localhost. A broker, bob listening, alice forwarding
 * a local port to bob's side of a small TCP echo service; bytes sent through the forward
 * must come back unchanged. Exit code 0 and "ok" on success.
 */
#include <natter.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int echo_fd;

static void *echo_server(void *arg) {
    (void)arg;
    for (;;) {
        int conn = accept(echo_fd, NULL, NULL);
        if (conn < 0) return NULL;
        char buf[65536];
        ssize_t n;
        while ((n = read(conn, buf, sizeof buf)) > 0) {
            if (write(conn, buf, (size_t)n) != n) break;
        }
        close(conn);
    }
}

static int listen_any(void) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    echo_fd = socket(AF_INET, SOCK_STREAM, 0);
    if (echo_fd < 0 || bind(echo_fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(echo_fd, 16) < 0 ||
        getsockname(echo_fd, (struct sockaddr *)&addr, &len) < 0) {
        perror("echo server");
        exit(1);
    }
    return ntohs(addr.sin_port);
}

static int check(long long rc, const char *what) {
    if (rc < 0) {
        fprintf(stderr, "%s failed (%lld): %s\n", what, rc, natter_last_error());
        exit(1);
    }
    return (int)rc;
}

static int round_trip(int port, const char *payload, size_t size) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) return -1;
    if (write(fd, payload, size) != (ssize_t)size) return -1;
    shutdown(fd, SHUT_WR);
    char *got = malloc(size + 1);
    size_t total = 0;
    ssize_t n;
    while (total <= size && (n = read(fd, got + total, size + 1 - total)) > 0) total += (size_t)n;
    close(fd);
    int same = total == size && memcmp(got, payload, size) == 0;
    free(got);
    return same ? 0 : -1;
}

int main(void) {
    pthread_t thread;
    int service = listen_any();
    pthread_create(&thread, NULL, echo_server, NULL);
    printf("natter %s\n", natter_version());

    char tmp_bob[] = "/tmp/natter-c-bob-XXXXXX", tmp_alice[] = "/tmp/natter-c-alice-XXXXXX";
    if (!mkdtemp(tmp_bob) || !mkdtemp(tmp_alice)) return 1;

    natter_handle broker = check(natter_broker_listen("127.0.0.1:0"), "broker");
    char broker_addr[64], remote[32];
    snprintf(broker_addr, sizeof broker_addr, "127.0.0.1:%d", check(natter_broker_port(broker), "broker port"));
    snprintf(remote, sizeof remote, ":%d", service);

    natter_handle bob = check(natter_client_new("bob", broker_addr, tmp_bob), "bob");
    check(natter_client_listen(bob), "bob listen");
    natter_handle alice = check(natter_client_new("alice", broker_addr, tmp_alice), "alice");
    natter_handle forward = check(natter_client_forward(alice, "127.0.0.1:0", "bob", remote), "forward");
    check(natter_client_connect(alice, "bob", 20.0), "tunnel");
    int port = check(natter_forward_port(forward), "forward port");

    size_t size = 1 << 20;
    char *payload = malloc(size);
    for (size_t i = 0; i < size; i++) payload[i] = (char)(i * 7 + i / 251);
    int result = round_trip(port, payload, size);
    free(payload);

    check(natter_forward_close(forward), "close forward");
    check(natter_client_close(alice), "close alice");
    check(natter_client_close(bob), "close bob");
    check(natter_broker_close(broker), "close broker");
    printf("%s: %zu bytes through 127.0.0.1:%d -> bob:%d\n", result == 0 ? "ok" : "MISMATCH", size, port, service);
    return result == 0 ? 0 : 1;
}
