# frozen_string_literal: true

require "mkmf"

# Each native library: the pkg-config name, the library and a function to
# probe it by, a header, and the packages that provide it.
LIBRARIES = [
  { pc: "libzmq", lib: "zmq", func: "zmq_ctx_new", header: "zmq.h",
    name: "libzmq", debian: "libzmq3-dev", brew: "zeromq", flag: "--with-zmq-dir" },
  { pc: "msgpack", lib: "msgpackc", func: "msgpack_pack_object", header: "msgpack.h",
    name: "msgpack-c", debian: "libmsgpack-dev", brew: "msgpack", flag: "--with-msgpackc-dir" },
  { pc: "libpq", lib: "pq", func: "PQconnectdb", header: "libpq-fe.h",
    name: "libpq", debian: "libpq-dev", brew: "libpq", flag: "--with-pq-dir" }
].freeze

dir_config("zmq")
dir_config("msgpackc")
dir_config("pq")

LIBRARIES.each do |l|
  found = pkg_config(l[:pc]) && have_header(l[:header]) && have_library(l[:lib], l[:func], l[:header])
  found ||= have_header(l[:header]) && have_library(l[:lib], l[:func], l[:header])
  next if found

  abort "tasker_core needs #{l[:name]} and could not find it: install #{l[:debian]} (Debian/Ubuntu) " \
        "or #{l[:brew]} (Homebrew), or point at it with #{l[:flag]}=PATH, then build again."
end

have_func("zmq_socket_monitor", "zmq.h")
have_func("rb_enc_interned_str", "ruby.h")

$CFLAGS << " -std=gnu11 -fvisibility=hidden -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers"
$CFLAGS << " -Werror" if ENV["TASKER_CORE_WERROR"] == "1"
if ENV["TASKER_CORE_ASAN"] == "1"
  $CFLAGS << " -fsanitize=address,undefined -fno-omit-frame-pointer -O1 -g"
  # No stack redzones when the extension runs inside an uninstrumented Ruby:
  # Ruby raises with __builtin_longjmp, which ASan cannot intercept, so every
  # exception unwinding through our frames (Timeout, Thread#raise, a TypeError
  # from NUM2INT) leaves their redzones poisoned, and the next uninstrumented
  # call that reuses that stack (libzmq, libc) is reported as a
  # stack-buffer-overflow. Heap, global and UB checks stay on; the fuzzers
  # (rake fuzz) check codec.c and protocol.c with stack redzones.
  $CFLAGS << (RbConfig::CONFIG["CC"].include?("clang") ? " -mllvm -asan-stack=0" : " --param asan-stack=0")
  $LDFLAGS << " -fsanitize=address,undefined"
end
$CFLAGS << " -O0 -g3" if ENV["TASKER_CORE_DEBUG"] == "1"

create_makefile("tasker_core/tasker_core_ext")
