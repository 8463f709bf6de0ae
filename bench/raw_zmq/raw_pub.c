/*
 * raw_pub: the baseline publisher. Binds an XPUB (XPUB_NODROP, so a full
 * pipe makes zmq_send block instead of dropping, like the handle's
 * publisher), waits for one subscription, prints "start <ns>" and sends
 * COUNT two-frame messages [TOPIC, SIZE bytes], then lingers until all are
 * delivered.
 *
 *   raw_pub ENDPOINT TOPIC SIZE COUNT [SNDHWM]
 */
#include "common.h"

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: raw_pub ENDPOINT TOPIC SIZE COUNT [SNDHWM]\n");
        return 2;
    }
    const char *endpoint = argv[1], *topic = argv[2];
    size_t size = strtoul(argv[3], NULL, 10);
    long count = strtol(argv[4], NULL, 10);
    int hwm = argc > 5 ? atoi(argv[5]) : 1000, one = 1, linger = -1;

    void *ctx = zmq_ctx_new();
    void *pub = zmq_socket(ctx, ZMQ_XPUB);
    if (!pub) die("zmq_socket");
    zmq_setsockopt(pub, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    zmq_setsockopt(pub, ZMQ_XPUB_NODROP, &one, sizeof(one));
    zmq_setsockopt(pub, ZMQ_LINGER, &linger, sizeof(linger));
    if (zmq_bind(pub, endpoint) != 0) die("zmq_bind");

    char sub[256];
    if (zmq_recv(pub, sub, sizeof(sub), 0) < 0) die("zmq_recv subscription");

    char *body = malloc(size ? size : 1);
    for (size_t i = 0; i < size; i++) body[i] = (char)('a' + i % 26);
    size_t tlen = strlen(topic);

    printf("start %lld\n", mono_ns());
    fflush(stdout);
    for (long i = 0; i < count; i++) {
        if (zmq_send(pub, topic, tlen, ZMQ_SNDMORE) < 0) die("zmq_send topic");
        if (zmq_send(pub, body, size, 0) < 0) die("zmq_send body");
    }
    printf("sent %lld\n", mono_ns());
    fflush(stdout);
    zmq_close(pub);
    zmq_ctx_term(ctx);
    free(body);
    return 0;
}
