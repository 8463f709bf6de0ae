/*
 * raw_sub: the baseline subscriber. Connects a SUB, subscribes to TOPIC,
 * prints "ready", receives COUNT two-frame messages and prints
 * "first <ns> last <ns> bytes <n>" (bytes of the bodies).
 *
 *   raw_sub ENDPOINT TOPIC COUNT [RCVHWM]
 */
#include "common.h"

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: raw_sub ENDPOINT TOPIC COUNT [RCVHWM]\n");
        return 2;
    }
    const char *endpoint = argv[1], *topic = argv[2];
    long count = strtol(argv[3], NULL, 10);
    int hwm = argc > 4 ? atoi(argv[4]) : 1000, linger = 0;

    void *ctx = zmq_ctx_new();
    void *sub = zmq_socket(ctx, ZMQ_SUB);
    if (!sub) die("zmq_socket");
    zmq_setsockopt(sub, ZMQ_RCVHWM, &hwm, sizeof(hwm));
    zmq_setsockopt(sub, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, topic, strlen(topic));
    if (zmq_connect(sub, endpoint) != 0) die("zmq_connect");
    printf("ready\n");
    fflush(stdout);

    long long first = 0, last = 0, bytes = 0;
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    for (long i = 0; i < count; i++) {
        if (zmq_msg_recv(&msg, sub, 0) < 0) die("zmq_msg_recv topic");
        if (i == 0) first = mono_ns();
        if (zmq_msg_recv(&msg, sub, 0) < 0) die("zmq_msg_recv body");
        bytes += (long long)zmq_msg_size(&msg);
    }
    last = mono_ns();
    zmq_msg_close(&msg);
    printf("first %lld last %lld bytes %lld\n", first, last, bytes);
    fflush(stdout);
    zmq_close(sub);
    zmq_ctx_term(ctx);
    return 0;
}
