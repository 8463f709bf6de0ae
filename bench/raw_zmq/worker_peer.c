/*
 * worker_peer: a minimal protocol-v1 worker in C for the transport
 * benchmark, so that the figures for the orchestration handle measure the
 * handle and not a Ruby worker. It speaks only what the handle needs:
 *   - SUB connects to BATCH_ENDPOINT, subscribes "batch.<WORKER_ID>.";
 *   - XPUB (XPUB_NODROP) connects to RESULT_ENDPOINT, waits for the
 *     orchestrator's subscription, sends one heartbeat with CAPACITY;
 *   - prints "ready", receives NBATCHES batches and prints
 *     "batches first <ns> last <ns> bytes <n>";
 *   - on a line "partials" on stdin prints "partial_bytes <n>" and
 *     "start <ns>", then sends NPARTIALS partial_result messages for step ids
 *     1..NPARTIALS, attempt 1 (the ids the benchmark published), and
 *     prints "sent <ns>";
 *   - exits on end of stdin, delivering what is queued first.
 *
 *   worker_peer BATCH_ENDPOINT RESULT_ENDPOINT WORKER_ID CAPACITY NBATCHES NPARTIALS
 */
#include "common.h"

#include <msgpack.h>
#include <unistd.h>

static void pack_cstr(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static double wall_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void send2(void *sock, const char *topic, const msgpack_sbuffer *b)
{
    if (zmq_send(sock, topic, strlen(topic), ZMQ_SNDMORE) < 0) die("zmq_send topic");
    if (zmq_send(sock, b->data, b->size, 0) < 0) die("zmq_send body");
}

static void pack_partial(msgpack_sbuffer *b, const char *worker_id, long long step_id)
{
    char batch_id[32];
    snprintf(batch_id, sizeof(batch_id), "b-%lld", (step_id - 1) / 100);
    double now = wall_s();
    msgpack_packer pk;
    msgpack_sbuffer_clear(b);
    msgpack_packer_init(&pk, b, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 14);
    pack_cstr(&pk, "protocol_version"); msgpack_pack_int(&pk, 1);
    pack_cstr(&pk, "type"); pack_cstr(&pk, "partial_result");
    pack_cstr(&pk, "batch_id"); pack_cstr(&pk, batch_id);
    pack_cstr(&pk, "worker_id"); pack_cstr(&pk, worker_id);
    pack_cstr(&pk, "step_id"); msgpack_pack_long_long(&pk, step_id);
    pack_cstr(&pk, "task_id"); msgpack_pack_long_long(&pk, (step_id - 1) / 10 + 1);
    pack_cstr(&pk, "attempt"); msgpack_pack_int(&pk, 1);
    pack_cstr(&pk, "status"); pack_cstr(&pk, "complete");
    pack_cstr(&pk, "output"); msgpack_pack_map(&pk, 1); pack_cstr(&pk, "ok"); msgpack_pack_true(&pk);
    pack_cstr(&pk, "error"); msgpack_pack_nil(&pk);
    pack_cstr(&pk, "started_at"); msgpack_pack_double(&pk, now);
    pack_cstr(&pk, "finished_at"); msgpack_pack_double(&pk, now);
    pack_cstr(&pk, "duration_ms"); msgpack_pack_double(&pk, 0.01);
    pack_cstr(&pk, "sent_at"); msgpack_pack_double(&pk, now);
}

int main(int argc, char **argv)
{
    if (argc < 7) {
        fprintf(stderr, "usage: worker_peer BATCH_ENDPOINT RESULT_ENDPOINT WORKER_ID CAPACITY NBATCHES NPARTIALS\n");
        return 2;
    }
    const char *batch_ep = argv[1], *result_ep = argv[2], *wid = argv[3];
    long long capacity = strtoll(argv[4], NULL, 10);
    long nbatches = strtol(argv[5], NULL, 10), npartials = strtol(argv[6], NULL, 10);
    int one = 1, linger = -1;

    void *ctx = zmq_ctx_new();
    void *sub = zmq_socket(ctx, ZMQ_SUB);
    void *pub = zmq_socket(ctx, ZMQ_XPUB);
    if (!sub || !pub) die("zmq_socket");
    char topic[160];
    snprintf(topic, sizeof(topic), "batch.%s.", wid);
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, topic, strlen(topic));
    zmq_setsockopt(pub, ZMQ_XPUB_NODROP, &one, sizeof(one));
    zmq_setsockopt(pub, ZMQ_LINGER, &linger, sizeof(linger));
    if (zmq_connect(sub, batch_ep) != 0) die("zmq_connect batch");
    if (zmq_connect(pub, result_ep) != 0) die("zmq_connect result");

    char buf[256];
    if (zmq_recv(pub, buf, sizeof(buf), 0) < 0) die("zmq_recv subscription");

    msgpack_sbuffer b;
    msgpack_sbuffer_init(&b);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &b, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 8);
    pack_cstr(&pk, "protocol_version"); msgpack_pack_int(&pk, 1);
    pack_cstr(&pk, "type"); pack_cstr(&pk, "heartbeat");
    pack_cstr(&pk, "worker_id"); pack_cstr(&pk, wid);
    pack_cstr(&pk, "pid"); msgpack_pack_int(&pk, (int)getpid());
    pack_cstr(&pk, "host"); pack_cstr(&pk, "bench");
    pack_cstr(&pk, "capacity"); msgpack_pack_long_long(&pk, capacity);
    pack_cstr(&pk, "in_flight"); msgpack_pack_int(&pk, 0);
    pack_cstr(&pk, "sent_at"); msgpack_pack_double(&pk, wall_s());
    send2(pub, "heartbeat", &b);
    printf("ready\n");
    fflush(stdout);

    long long first = 0, last = 0, bytes = 0;
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    for (long i = 0; i < nbatches; i++) {
        if (zmq_msg_recv(&msg, sub, 0) < 0) die("zmq_msg_recv topic");
        if (i == 0) first = mono_ns();
        if (zmq_msg_recv(&msg, sub, 0) < 0) die("zmq_msg_recv body");
        bytes += (long long)zmq_msg_size(&msg);
    }
    last = mono_ns();
    zmq_msg_close(&msg);
    printf("batches first %lld last %lld bytes %lld\n", first, last, bytes);
    fflush(stdout);

    char line[64];
    while (fgets(line, sizeof(line), stdin)) {
        if (strncmp(line, "partials", 8) != 0) continue;
        pack_partial(&b, wid, 1);
        printf("partial_bytes %zu\n", b.size);
        printf("start %lld\n", mono_ns());
        fflush(stdout);
        for (long long id = 1; id <= npartials; id++) {
            pack_partial(&b, wid, id);
            send2(pub, "partial_result", &b);
        }
        printf("sent %lld\n", mono_ns());
        fflush(stdout);
    }
    msgpack_sbuffer_destroy(&b);
    zmq_close(sub);
    zmq_close(pub);
    zmq_ctx_term(ctx);
    return 0;
}
