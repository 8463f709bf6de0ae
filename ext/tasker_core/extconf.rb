# frozen_string_literal: true

require "mkmf"

require_relative "extconf_helpers"

dir_config("zmq")
dir_config("msgpackc")
dir_config("pq")

# pkg-config (under either name, see extconf_helpers.rb) then the header and
# the library; without pkg-config, the header and either library name.
TaskerCoreExtconf::LIBRARIES.each do |l|
  _pc, libs = TaskerCoreExtconf.choose(l) { |name| pkg_config(name) }
  next if have_header(l[:header]) && libs.any? { |lib| have_library(lib, l[:func], l[:header]) }

  abort TaskerCoreExtconf.missing_message(l)
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
