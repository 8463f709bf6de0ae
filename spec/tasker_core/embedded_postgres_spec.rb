# frozen_string_literal: true

require "tmpdir"

RSpec.describe TaskerCore::EmbeddedPostgres do
  it "finds the server programs" do
    expect(File.executable?(File.join(described_class.bindir, "initdb"))).to be(true)
  end

  it "starts a cluster, reuses it when started again, and stops it" do
    dir = Dir.mktmpdir("tasker_pg_spec")
    File.chmod(0o755, dir)
    url = described_class.start(dir: dir, database: "tasker_embedded_spec")
    expect(url).to match(%r{\Apostgresql://postgres@127\.0\.0\.1:\d+/tasker_embedded_spec\z})
    c = connect(url)
    expect(c.exec("SELECT current_database() AS d, current_setting('fsync') AS f").first)
      .to eq("d" => "tasker_embedded_spec", "f" => "on")
    pid = File.read(File.join(dir, "data", "postmaster.pid")).to_i
    expect(described_class.start(dir: dir, database: "tasker_embedded_spec")).to eq(url)
    expect(File.read(File.join(dir, "data", "postmaster.pid")).to_i).to eq(pid)
    c.close
    expect(described_class.stop(dir: dir)).to be(true)
    expect(described_class.running?(dir: dir)).to be(false)
    expect(described_class.stop(dir: dir)).to be(false)
  ensure
    described_class.stop(dir: dir) if dir
    FileUtils.rm_rf(dir) if dir
  end
end
