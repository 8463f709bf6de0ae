# frozen_string_literal: true

RSpec.describe TaskerCore::Discovery, :db do
  let(:name) { "orders-#{SecureRandom.hex(4)}" }
  let(:a) { { batch_endpoint: "tcp://10.0.0.1:5555", result_endpoint: "tcp://10.0.0.1:5556" } }
  let(:b) { { batch_endpoint: "tcp://10.0.0.2:5555", result_endpoint: "tcp://10.0.0.2:5556" } }

  after do
    (@registrations || []).each(&:stop)
    (@watchers || []).each(&:stop)
  end

  def register(endpoints, **opts)
    described_class.register(name, endpoints, url: db_url, ttl: 0.6, **opts).tap { |r| (@registrations ||= []) << r }
  end

  def watch(&block)
    described_class.watch(name, url: db_url, poll_interval: 0.1, &block).tap { |w| (@watchers ||= []) << w }
  end

  def lookup = described_class.lookup(name, url: db_url)

  it "registers endpoints under a name and looks them up" do
    expect(lookup).to be_nil
    reg = register(a)
    entry = lookup
    expect(entry.endpoints).to eq(a)
    expect(entry.owner).to eq(reg.owner)
    expect(entry.version).to eq(reg.version)
    expect(entry.lease_expires_at).to be > Time.now
  end

  it "refuses a name another live orchestrator holds, and hands it over once revoked" do
    first = register(a)
    expect { register(b) }.to raise_error(TaskerCore::Discovery::NameTakenError, /#{first.owner}/)
    standby = Thread.new { register(b, wait: 30) }
    wait_until { standby.status == "sleep" }
    first.stop
    second = standby.value
    expect(lookup.endpoints).to eq(b)
    expect(second.version).to be > first.version
  end

  it "keeps the lease alive past its ttl while the registration runs" do
    reg = register(a)
    expires = lookup.lease_expires_at
    wait_until(message: "two renewals") { reg.renewals >= 2 }
    later = lookup
    expect(later.endpoints).to eq(a)
    expect(later.lease_expires_at).to be > expires
  end

  it "revokes on a clean stop: the entry is gone at once and watchers hear of it" do
    reg = register(a)
    seen = Queue.new
    watch { |e| seen << e }
    expect(seen.pop&.endpoints).to eq(a)
    expect(reg.stop).to be(true)
    expect(lookup).to be_nil
    expect(seen.pop).to be_nil
    expect(reg.stop).to be(false) # idempotent
  end

  it "lets a killed orchestrator's entry expire with its lease" do
    pid = spawn_ruby(<<~RUBY, env: { "DATABASE_URL" => db_url })
      require "tasker_core"
      TaskerCore::Discovery.register(#{name.inspect}, { batch_endpoint: "tcp://10.9.9.9:1", result_endpoint: "tcp://10.9.9.9:2" }, ttl: 0.6)
      sleep
    RUBY
    entry = wait_until(message: "the child's registration") { lookup }
    expect(entry.batch_endpoint).to eq("tcp://10.9.9.9:1")
    # alive: it outlives its first lease
    wait_until(message: "a renewal") { lookup&.lease_expires_at.to_f > entry.lease_expires_at.to_f }
    Process.kill(:KILL, -pid)
    wait_until(message: "the lease to expire") { lookup.nil? }
    stale = described_class.read(name, url: db_url)
    expect(stale.live).to be(false)
    expect(stale.version).to eq(entry.version) # nobody revoked it
    expect { register(b) }.not_to raise_error # the name is free again
  end

  it "watches: the current entry first, then each change once, in version order" do
    seen = Queue.new
    watch { |e| seen << e }
    expect(seen.pop).to be_nil # nothing registered yet
    first = register(a)
    expect(seen.pop.endpoints).to eq(a)
    first.stop
    expect(seen.pop).to be_nil
    register(b)
    got = seen.pop
    expect(got.endpoints).to eq(b)
    # a second watcher started now sees only the current state
    late = Queue.new
    w2 = watch { |e| late << e }
    expect(late.pop.endpoints).to eq(b)
    expect(w2.deliveries).to eq(1)
    expect(seen).to be_empty
  end

  it "notices an expired lease with nobody notifying" do
    pid = spawn_ruby(<<~RUBY, env: { "DATABASE_URL" => db_url })
      require "tasker_core"
      TaskerCore::Discovery.register(#{name.inspect}, { batch_endpoint: "tcp://10.9.9.8:1", result_endpoint: "tcp://10.9.9.8:2" }, ttl: 0.6)
      sleep
    RUBY
    wait_until { lookup }
    seen = Queue.new
    watch { |e| seen << e }
    expect(seen.pop.batch_endpoint).to eq("tcp://10.9.9.8:1")
    Process.kill(:KILL, -pid)
    expect(seen.pop).to be_nil
  end

  it "never acts twice on one change when notifications repeat" do
    seen = Queue.new
    watcher = watch { |e| seen << e }
    seen.pop
    reg = register(a)
    seen.pop
    # replay the registration's notification, as a reconnecting listener might receive it
    connect.exec(<<~SQL, [name])
      SELECT tasker_discovery_notify(o, true) FROM tasker_orchestrators o WHERE name = $1
    SQL
    reg.stop
    expect(seen.pop).to be_nil
    expect(watcher.deliveries).to eq(3) # nil, a, nil: the replay changed nothing
  end

  it "advertises a wildcard bind with the host name" do
    expect(described_class.advertised("tcp://*:5555")).to eq("tcp://#{Socket.gethostname}:5555")
    expect(described_class.advertised("tcp://0.0.0.0:5556")).to eq("tcp://#{Socket.gethostname}:5556")
    expect(described_class.advertised("tcp://10.1.2.3:5556")).to eq("tcp://10.1.2.3:5556")
  end
end
