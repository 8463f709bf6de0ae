# frozen_string_literal: true

# What extconf.rb decides before it asks the compiler, kept apart so a spec
# can check it with made-up pkg-config answers (spec/extconf_helpers_spec.rb).
module TaskerCoreExtconf
  # Each native library: its pkg-config names and library names (one variant
  # per packaging, newest first), a function to probe it by, a header, and
  # where it comes from.
  #
  # msgpack-c 6 renamed its library and pkg-config file from msgpackc /
  # msgpack.pc to msgpack-c / msgpack-c.pc (Debian 13, Ubuntu 24.04,
  # Homebrew); Debian 12 and Ubuntu 22.04 ship msgpack-c 3/4 under the old
  # names. Either is accepted.
  LIBRARIES = [
    { name: "libzmq", variants: [{ pc: "libzmq", lib: "zmq" }], func: "zmq_ctx_new", header: "zmq.h",
      packages: "libzmq3-dev (Debian/Ubuntu) or zeromq (Homebrew)", flag: "--with-zmq-dir" },
    { name: "msgpack-c", variants: [{ pc: "msgpack-c", lib: "msgpack-c" }, { pc: "msgpack", lib: "msgpackc" }],
      func: "msgpack_pack_object", header: "msgpack.h",
      packages: "libmsgpack-c-dev (msgpack-c 6: Debian 13, Ubuntu 24.04) or libmsgpack-dev " \
                "(Debian 12, Ubuntu 22.04), or msgpack (Homebrew)",
      flag: "--with-msgpackc-dir" },
    { name: "libpq", variants: [{ pc: "libpq", lib: "pq" }], func: "PQconnectdb", header: "libpq-fe.h",
      packages: "libpq-dev (Debian/Ubuntu) or libpq (Homebrew)", flag: "--with-pq-dir" }
  ].freeze

  module_function

  # Asks pkg-config for each variant's name in turn (the block answers
  # whether pkg-config knows a name, as mkmf's pkg_config does, adding its
  # flags) and returns the name it knew (nil for none) and the library
  # names to try linking, the one that name belongs to first.
  def choose(library)
    variants = library[:variants]
    chosen = variants.find { |v| yield(v[:pc]) }
    libs = variants.map { |v| v[:lib] }
    libs.unshift(libs.delete(chosen[:lib])) if chosen
    [chosen && chosen[:pc], libs]
  end

  def missing_message(library)
    pcs = library[:variants].map { |v| v[:pc] }.join(" or ")
    libs = library[:variants].map { |v| "-l#{v[:lib]}" }.join(" or ")
    "tasker_core needs #{library[:name]} and could not find it (pkg-config #{pcs}, #{library[:header]} with " \
      "#{libs}): install #{library[:packages]}, or point at it with #{library[:flag]}=PATH, then build again."
  end
end
