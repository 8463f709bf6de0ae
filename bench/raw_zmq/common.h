/*
 * common.h: helpers shared by the raw libzmq programs of the transport
 * benchmark (bench/transport_bench.rb): monotonic time in ns (the same
 * clock as Ruby's CLOCK_MONOTONIC, so figures from two processes compare)
 * and dying with a message.
 */
#ifndef BENCH_RAW_ZMQ_COMMON_H
#define BENCH_RAW_ZMQ_COMMON_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

static long long mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "%s: %s\n", what, zmq_strerror(zmq_errno()));
    exit(1);
}

#endif
