# frozen_string_literal: true

require "tmpdir"
require "open3"
require "rbconfig"
require "fileutils"
require_relative "../ext/tasker_core/extconf_helpers"

# extconf.rb finds msgpack-c under its msgpack-c 6 names (pkg-config
# msgpack-c, library msgpack-c) or its older ones (msgpack, msgpackc).
RSpec.describe TaskerCoreExtconf do
  let(:msgpack) { described_class::LIBRARIES.find { |l| l[:name] == "msgpack-c" } }

  def choose(known)
    asked = []
    result = described_class.choose(msgpack) { |name| asked << name && known.include?(name) }
    [*result, asked]
  end

  it "takes msgpack-c 6's pkg-config name and tries its library first" do
    expect(choose(%w[msgpack-c])).to eq(["msgpack-c", %w[msgpack-c msgpackc], %w[msgpack-c]])
  end

  it "falls back to the older pkg-config name and library" do
    expect(choose(%w[msgpack])).to eq(["msgpack", %w[msgpackc msgpack-c], %w[msgpack-c msgpack]])
  end

  it "tries both library names when pkg-config knows neither" do
    expect(choose([])).to eq([nil, %w[msgpack-c msgpackc], %w[msgpack-c msgpack]])
  end

  it "names both packagings when msgpack-c is missing" do
    message = described_class.missing_message(msgpack)
    expect(message).to include("pkg-config msgpack-c or msgpack", "-lmsgpack-c or -lmsgpackc",
                               "libmsgpack-c-dev", "libmsgpack-dev", "--with-msgpackc-dir")
  end

  # The real extconf.rb on this machine's msgpack-c, dressed up as each
  # packaging: pkg-config sees only the .pc files in a folder of our own
  # (PKG_CONFIG_LIBDIR), and for msgpack-c 6 the library is reached under
  # its new name through a symlink.
  describe "extconf.rb", :no_valgrind do
    let(:system_pc) { `pkg-config --variable pcfiledir msgpack`.strip }

    def run_extconf(dir, pc_files)
      pcdir = File.join(dir, "pc")
      FileUtils.mkdir_p(pcdir)
      # every .pc file of the system (libzmq's and libpq's need theirs) but msgpack-c's
      pc_path = `pkg-config --variable pc_path pkg-config`.strip.split(":")
      Dir[*pc_path.map { |d| File.join(d, "*.pc") }].reject { |f| File.basename(f).start_with?("msgpack") }
                                                    .each { |f| FileUtils.ln_sf(f, pcdir) }
      pc_files.each { |name, text| File.write(File.join(pcdir, "#{name}.pc"), text) }
      env = { "PKG_CONFIG_LIBDIR" => pcdir, "PKG_CONFIG_PATH" => nil }
      out, status = Open3.capture2e(env, RbConfig.ruby, File.join(SpecHelpers::ROOT, "ext/tasker_core/extconf.rb"),
                                    chdir: dir)
      [out, status, File.exist?(File.join(dir, "Makefile")) ? File.read(File.join(dir, "Makefile")) : ""]
    end

    it "builds against msgpack-c 6's names (msgpack-c.pc, -lmsgpack-c)" do
      skip "no msgpack.pc on this machine" if system_pc.empty?
      Dir.mktmpdir("tasker_extconf") do |dir|
        # where the compiler finds the library (msgpack.pc's libdir may not say)
        library = `#{RbConfig::CONFIG["CC"].split.first} -print-file-name=libmsgpackc.so`.strip
        skip "no libmsgpackc.so found by the compiler" unless library.start_with?("/") && File.exist?(library)
        includedir = `pkg-config --variable includedir msgpack`.strip
        FileUtils.mkdir_p(File.join(dir, "lib"))
        File.symlink(library, File.join(dir, "lib", "libmsgpack-c.so"))
        pc = <<~PC
          Name: msgpack-c
          Description: MessagePack implementation for C (as msgpack-c 6 names it)
          Version: 6.0.0
          Libs: -L#{dir}/lib -lmsgpack-c
          Cflags: -I#{includedir}
        PC
        out, status, makefile = run_extconf(dir, { "msgpack-c" => pc })
        expect(status).to be_success, out
        expect(out).to match(/checking for msgpack_pack_object\(\) in -lmsgpack-c\.\.\. yes/)
        expect(makefile).to match(/^LIBS = .*-lmsgpack-c\b/)
        expect(makefile).not_to include("-lmsgpackc")
      end
    end

    it "builds against the older names (msgpack.pc, -lmsgpackc)" do
      skip "no msgpack.pc on this machine" if system_pc.empty?
      Dir.mktmpdir("tasker_extconf") do |dir|
        out, status, makefile = run_extconf(dir, { "msgpack" => File.read(File.join(system_pc, "msgpack.pc")) })
        expect(status).to be_success, out
        expect(out).to match(/checking for msgpack_pack_object\(\) in -lmsgpack-c\.\.\. no/)
          .or match(/in -lmsgpackc\.\.\. yes/)
        expect(makefile).to match(/^LIBS = .*-lmsgpackc\b/)
      end
    end
  end
end
