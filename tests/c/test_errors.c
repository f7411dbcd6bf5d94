/*
 * libnatter's error paths and thread safety, driven from C. Every call must return an
 * error code with a message, never crash: NULL arguments, invalid addresses, a forward to
 * an unknown peer, double closes, stale handles; two clients in one process; calls from
 * two threads at once. Prints "N passed, 0 failed" and exits 0 when all checks hold.
 * Run under AddressSanitizer by `make test-c`.
 */
#include <natter.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int passed, failed;

#define CHECK(cond, what)                                                     \
    do {                                                                      \
        if (cond) {                                                           \
            passed++;                                                         \
        } else {                                                              \
            failed++;                                                         \
            fprintf(stderr, "FAIL %s:%d %s (last error: %s)\n", __FILE__, __LINE__, what, natter_last_error()); \
        }                                                                     \
    } while (0)

static int has_message(void) { return natter_last_error() != NULL && strlen(natter_last_error()) > 0; }

static char broker_addr[64];

static void *thread_client(void *arg) {
    const char *name = arg;
    char dir[] = "/tmp/natter-ctest-XXXXXX";
    if (!mkdtemp(dir)) return (void *)1;
    natter_handle client = natter_client_new(name, broker_addr, dir);
    if (client <= 0) return (void *)1;
    int ok = natter_client_listen(client) == 0;
    /* a bad call on this thread sets only this thread's message */
    ok = ok && natter_client_forward(client, "not an address", "bob", ":22") == NATTER_E_INVALID && has_message();
    ok = ok && natter_client_close(client) == 0;
    return ok ? NULL : (void *)1;
}

int main(void) {
    CHECK(strlen(natter_version()) > 0, "version");

    /* NULLs and malformed input */
    CHECK(natter_broker_listen(NULL) == NATTER_E_INVALID && has_message(), "broker NULL address");
    CHECK(natter_broker_listen("nonsense") == NATTER_E_INVALID && has_message(), "broker bad address");
    CHECK(natter_broker_listen("127.0.0.1:99999") < 0 && has_message(), "broker port out of range");
    CHECK(natter_client_new(NULL, "127.0.0.1:1", NULL) == NATTER_E_INVALID, "client NULL name");
    CHECK(natter_client_new("bob", NULL, NULL) == NATTER_E_INVALID, "client NULL broker");
    CHECK(natter_client_new("bad name!", "127.0.0.1:1", NULL) == NATTER_E_INVALID && has_message(), "client bad name");
    CHECK(natter_client_new("bob", "no-port", NULL) == NATTER_E_INVALID && has_message(), "client bad broker");

    /* stale and wrong handles */
    CHECK(natter_client_listen(424242) == NATTER_E_HANDLE && has_message(), "unknown client handle");
    CHECK(natter_forward_close(-5) == NATTER_E_HANDLE, "negative handle");
    CHECK(natter_broker_port(0) == NATTER_E_HANDLE, "zero handle");

    natter_handle broker = natter_broker_listen("127.0.0.1:0");
    CHECK(broker > 0, "broker");
    CHECK(natter_client_listen(broker) == NATTER_E_HANDLE, "broker handle used as a client");
    snprintf(broker_addr, sizeof broker_addr, "127.0.0.1:%d", natter_broker_port(broker));
    CHECK(strcmp(natter_last_error(), "") == 0, "success clears the message");

    /* two clients in one process, a forward to an unknown peer */
    char d1[] = "/tmp/natter-ctest-XXXXXX", d2[] = "/tmp/natter-ctest-XXXXXX";
    if (!mkdtemp(d1) || !mkdtemp(d2)) return 1;
    natter_handle alice = natter_client_new("alice", broker_addr, d1);
    natter_handle carol = natter_client_new("carol", broker_addr, d2);
    CHECK(alice > 0 && carol > 0 && alice != carol, "two clients");
    CHECK(natter_client_listen(carol) == 0, "carol listens");
    CHECK(natter_client_forward(alice, "127.0.0.1:0", NULL, ":22") == NATTER_E_INVALID, "forward NULL peer");
    CHECK(natter_client_forward(alice, "127.0.0.1:0", "bob", "nowhere") == NATTER_E_INVALID, "forward bad remote");
    natter_handle ghost = natter_client_forward(alice, "127.0.0.1:0", "nobody", ":22");
    CHECK(ghost > 0, "forward to an unknown peer binds and retries");
    CHECK(natter_client_connect(alice, "nobody", 5.0) == NATTER_E_FAILED && strstr(natter_last_error(), "nobody"),
          "unknown peer is named");
    CHECK(natter_client_connect(alice, "carol", 20.0) == 0, "tunnel alice -> carol");
    CHECK(natter_forward_port(ghost) > 0, "forward port");
    CHECK(natter_forward_close(ghost) == 0, "close forward");
    CHECK(natter_forward_close(ghost) == NATTER_E_HANDLE && has_message(), "double close forward");
    CHECK(natter_forward_port(ghost) == NATTER_E_HANDLE, "closed forward");
    natter_handle udp = natter_client_forward(alice, "127.0.0.1:0", "carol", ":53/udp");
    CHECK(udp > 0 && natter_forward_port(udp) > 0, "UDP forward");
    natter_handle socks = natter_client_forward(alice, "127.0.0.1:0", "carol", "socks");
    CHECK(socks > 0 && natter_forward_port(socks) > 0, "SOCKS forward");
    CHECK(natter_forward_close(udp) == 0 && natter_forward_close(socks) == 0, "close UDP and SOCKS forwards");
    CHECK(natter_client_forward(alice, "127.0.0.1:0", "carol", ":53/sctp") == NATTER_E_INVALID && has_message(),
          "forward bad protocol");

    /* two threads at once */
    pthread_t t1, t2;
    pthread_create(&t1, NULL, thread_client, "dave");
    pthread_create(&t2, NULL, thread_client, "erin");
    void *r1, *r2;
    pthread_join(t1, &r1);
    pthread_join(t2, &r2);
    CHECK(r1 == NULL && r2 == NULL, "clients from two threads");

    CHECK(natter_client_close(alice) == 0 && natter_client_close(carol) == 0, "close clients");
    CHECK(natter_client_close(alice) == NATTER_E_HANDLE, "double close client");
    CHECK(natter_broker_close(broker) == 0, "close broker");
    CHECK(natter_broker_close(broker) == NATTER_E_HANDLE, "double close broker");

    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
