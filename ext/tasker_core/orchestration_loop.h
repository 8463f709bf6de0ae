/*
 * orchestration_loop.h: the native orchestration loop. A pthread owned by
 * an orchestration handle that drives the handle core (orchestration_handle.h)
 * and the PostgreSQL store (store.h, its own connection): claim ready steps,
 * send them to workers by free capacity, read results, write them back in
 * one statement per iteration, release the steps of lost workers, requeue
 * expired claims. It never holds the GVL and runs no Ruby; Ruby reads its
 * state through the mutex (tc_loop_lock) and tc_loop_stats_snapshot.
 * The loop is the only thread that changes the handle core while it runs:
 * it reads the core without the mutex and takes it only around changes,
 * never around a pack, a send or a statement.
 */
#ifndef TASKER_CORE_ORCHESTRATION_LOOP_H
#define TASKER_CORE_ORCHESTRATION_LOOP_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "orchestration_handle.h"

#define TC_LOOP_OWNER_MAX 127
#define TC_LOOP_LATENCY_RING 1024
/* A step lost this many times (its worker died, its lease expired, ...) is
 * a suspect: it may be what kills its workers. It is dispatched alone to a
 * worker with nothing in flight, which gets nothing else until the step's
 * result or loss (docs/protocol.md section 5). One crash or deploy costs a
 * step one loss, so an innocent step is isolated only after a second. */
#define TC_LOOP_SUSPECT_LOST 2
/* A claimed step that no live worker serving its queue can run (each
 * refused its handler) goes back to pending, ready again this much later,
 * so it is not claimed and put back in a loop. */
#define TC_LOOP_NO_HANDLER_DELAY_MS 1000

typedef struct tc_loop_config {
    const char *conninfo;
    const char *owner;
    int batch_size;
    int lease_ms;
    int poll_interval_ms;
    int housekeeping_interval_ms; /* requeue_expired + tasker_workers upsert */
    size_t max_pending_results;   /* bound of the buffer kept while PostgreSQL is away */
    int max_lost_attempts;        /* lost attempts before StepLostError (orchestration.max_lost_attempts) */
    /* Queues with a concurrency limit and the limits (config queues.<name>.concurrency), as PostgreSQL
     * array literals (text[] and int[]), passed to every claim: "{}" for none */
    const char *limited_queues;
    const char *queue_limits;
} tc_loop_config;

typedef struct tc_loop_stats {
    uint64_t claimed, dispatched, completed, failed, retried, redispatched, released, timed_out;
    /* lost attempts over max_lost_attempts (StepLostError); steps failed at
     * the edge: over every live worker's max_message_bytes / max_payload_depth,
     * or refused by their worker as too_deep / invalid_step */
    uint64_t lost_failed, failed_too_large, failed_too_deep, failed_refused;
    uint64_t batches_split_by_bytes; /* batches cut short by max_message_bytes, not by steps */
    uint64_t isolated;               /* suspect steps sent alone to an idle worker */
    uint64_t isolation_drains;       /* workers drained for a waiting suspect (no worker was idle) */
    /* steps refused by a worker as unknown_handler, handed back without a
     * lost attempt; claimed steps no worker serving their queue has the
     * handler for, put back for TC_LOOP_NO_HANDLER_DELAY_MS */
    uint64_t handed_back_unknown_handler, deferred_no_handler;
    uint64_t handed_back_draining; /* refused unstarted by a draining worker: back to pending, no attempt lost */
    uint64_t stale_results, applied_results, results_dropped;
    uint64_t db_reconnects, db_errors, db_connected;
    uint64_t claim_calls, apply_calls, iterations;
    uint64_t latency_last_us, latency_max_us, latency_p50_us, latency_p99_us;
    double latency_avg_us;
    uint64_t pending_results;
    char last_db_error[256];
} tc_loop_stats;

typedef struct tc_loop tc_loop;

/* Copies the configuration; the handle core is borrowed and must outlive
 * the loop. NULL with err on failure (out of memory, pipe). */
tc_loop *tc_loop_new(tc_oh *oh, const tc_loop_config *cfg, char *err, size_t errlen);

/* Opens the loop's own connection (blocking: call it without the GVL).
 * 0 ok; -1 with err naming host and port. */
int tc_loop_connect(tc_loop *l, char *err, size_t errlen);

/* Starts the thread. 0 ok; -1 with err. */
int tc_loop_start(tc_loop *l, char *err, size_t errlen);

/* Asks the thread to stop and wakes it; async-signal-safe (a flag and a
 * write(2)), so it is fit for an unblocking function. */
void tc_loop_request_stop(tc_loop *l);

/* Waits for the thread up to timeout_ms (< 0: forever); 0 joined, -1 still
 * running (ETIMEDOUT) or interrupted (*interrupt became non-zero). */
int tc_loop_join(tc_loop *l, long timeout_ms, volatile int *interrupt);

int tc_loop_running(const tc_loop *l); /* started and not yet joined */

/* Frees a loop that is not running. */
void tc_loop_free(tc_loop *l);

/* Guards the handle core while the thread runs: readers take it. */
void tc_loop_lock(tc_loop *l);
void tc_loop_unlock(tc_loop *l);

/* The handle's socket counters as of the loop's last send (the loop
 * sends without the lock, so readers take these, not the sockets'); call
 * it under tc_loop_lock. */
void tc_loop_socket_counters(tc_loop *l, tc_socket_counters *batch, tc_socket_counters *result);

void tc_loop_stats_snapshot(tc_loop *l, tc_loop_stats *out);

#endif
