# frozen_string_literal: true

# The process's connection pool against a real PostgreSQL whose sessions
# are terminated (pg_terminate_backend) or whose server is restarted.
RSpec.describe TaskerCore::Store::Pool, :db do
  let(:conn) { connect }
  let(:pool) { described_class.new(url: db_url, size: 2, connect_timeout: 5) }

  after { pool.disconnect! }

  def backend_pid(c) = c.exec("SELECT pg_backend_pid() AS p").first["p"]

  # Ends a session from the server side and waits until its process has
  # exited (it has sent its FATAL goodbye then).
  def terminate(pid)
    if conn.server_version >= 140_000
      expect(conn.exec("SELECT pg_terminate_backend($1, 10000) AS ok", [pid]).first["ok"]).to be(true)
    else
      conn.exec("SELECT pg_terminate_backend($1)", [pid])
      wait_until(timeout: 10, interval: 0.02, message: "backend #{pid} gone") do
        conn.exec("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1", [pid]).first["n"].zero?
      end
    end
  end

  # Both connections opened and back in the pool, idle.
  def fill(pool)
    ready = Queue.new
    go = Queue.new
    threads = Array.new(pool.size) do
      Thread.new { pool.with_connection { |c| ready << backend_pid(c); go.pop } }
    end
    pids = Array.new(pool.size) { ready.pop }
    pool.size.times { go << true }
    threads.each(&:join)
    pids
  end

  it "sees that an idle connection's session ended (Connection#alive?)" do
    c = connect
    terminate(backend_pid(c))
    expect(c.usable?).to be(true) # libpq has not read the socket yet
    expect(c.alive?).to be(false)
    expect(c.usable?).to be(false)
    expect(conn.alive?).to be(true)
  end

  it "replaces idle connections whose sessions ended instead of handing them out" do
    fill(pool).each { |pid| terminate(pid) }
    expect(pool.with_connection { |c| c.exec("SELECT 1 AS one").first["one"] }).to eq(1)
    expect(pool.reconnects).to eq(2)
    expect(pool.with_connection { |c| c.exec("SELECT 2 AS two").first["two"] }).to eq(2)
    expect(pool.reconnects).to eq(2)
  end

  it "runs an idempotent block once more on a new connection when its connection is lost under it" do
    runs = 0
    result = pool.with_connection(idempotent: true) do |c|
      runs += 1
      terminate(backend_pid(c)) if runs == 1
      c.exec("SELECT 3 AS three").first["three"]
    end
    expect(result).to eq(3)
    expect(runs).to eq(2)
    expect(pool.reconnects).to eq(1)
  end

  it "raises to a block that is not idempotent, and the pool recovers" do
    runs = 0
    expect do
      pool.with_connection do |c|
        runs += 1
        terminate(backend_pid(c))
        c.exec("SELECT 1")
      end
    end.to raise_error(TaskerCore::StoreError) { |e| expect(e.sqlstate).to match(described_class::LOST_SQLSTATES) }
    expect(runs).to eq(1)
    expect(pool.with_connection { |c| c.exec("SELECT 1 AS one").first["one"] }).to eq(1)
  end

  it "recovers from a PostgreSQL restart without raising to create_task or task" do
    skip "needs the embedded cluster (DATABASE_URL is external)" unless DatabaseHelpers.pg_dir
    use_templates(template("linear", [step("a"), step("b", ["a"])]))
    TaskerCore::Store.pool = pool
    fill(pool)
    close_db_connections
    TaskerCore::EmbeddedPostgres.stop(dir: DatabaseHelpers.pg_dir)
    expect(TaskerCore::EmbeddedPostgres.start(dir: DatabaseHelpers.pg_dir, database: "tasker_test")).to eq(db_url)

    id = TaskerCore.create_task(name: "linear", context: { "n" => 1 })
    expect(pool.reconnects).to eq(2) # both pooled connections had died with the server
    expect(TaskerCore.task(id)).to include(status: "pending")
    expect(TaskerCore.create_task(name: "linear", identity_key: "k")).to eq(TaskerCore.create_task(name: "linear", identity_key: "k"))
    expect(pool.reconnects).to eq(2)
  end
end
