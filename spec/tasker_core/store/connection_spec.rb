# frozen_string_literal: true

RSpec.describe TaskerCore::Store::Connection do
  let(:conn) { connect }

  it "decodes values by column type" do
    row = conn.exec(<<~SQL, [42, "héllo", 2.5, true]).first
      SELECT 1::int2 AS i2, 2::int4 AS i4, 9007199254740993::int8 AS i8, $1::int AS param,
             $2::text AS t, $3::float8 AS f8, 1.25::float4 AS f4, $4::boolean AS b, false AS f,
             NULL::int AS n, 12.50::numeric AS num, ARRAY[1, NULL, 3]::int[] AS ints,
             ARRAY['a,b', 'c"d', NULL]::text[] AS texts, '{}'::int[] AS empty
    SQL
    expect(row).to eq("i2" => 1, "i4" => 2, "i8" => 9_007_199_254_740_993, "param" => 42, "t" => "héllo",
                      "f8" => 2.5, "f4" => 1.25, "b" => true, "f" => false, "n" => nil, "num" => "12.50",
                      "ints" => [1, nil, 3], "texts" => ["a,b", 'c"d', nil], "empty" => [])
    expect(row["t"].encoding).to eq(Encoding::UTF_8)
  end

  it "round-trips bytea, alone and in arrays, including NUL and high bytes" do
    bytes = (0..255).map(&:chr).join.b
    row = conn.exec("SELECT $1::bytea AS b, $2::bytea[] AS arr, octet_length($1::bytea) AS n",
                    [bytes, [bytes, nil, "".b]]).first
    expect(row["b"]).to eq(bytes)
    expect(row["b"].encoding).to eq(Encoding::BINARY)
    expect(row["n"]).to eq(256)
    expect(row["arr"]).to eq([bytes, nil, "".b])
  end

  it "sends nil as NULL and arrays as array literals" do
    row = conn.exec("SELECT $1::text IS NULL AS isnull, $2::bigint[] AS ids, $3::boolean[] AS flags",
                    [nil, [1, 2, 3], [true, false, nil]]).first
    expect(row).to eq("isnull" => true, "ids" => [1, 2, 3], "flags" => [true, false, nil])
  end

  it "raises StoreError with the SQLSTATE and the server's message" do
    expect { conn.exec("SELECT 1/0") }.to raise_error(TaskerCore::StoreError, /division by zero.*22012/) { |e|
      expect(e.sqlstate).to eq("22012")
    }
    expect { conn.exec("SELEC 1") }.to raise_error(TaskerCore::StoreError) { |e| expect(e.sqlstate).to eq("42601") }
    expect(conn.exec("SELECT 2 AS x")).to eq([{ "x" => 2 }])
  end

  it "names host and port, never the password, when the database is unreachable" do
    port = free_port
    expect { described_class.new("postgresql://someone:s3cret@127.0.0.1:#{port}/x", connect_timeout: 2) }
      .to raise_error(TaskerCore::StoreError, /127\.0\.0\.1:#{port}/) { |e|
        expect(e.message).not_to include("s3cret")
        expect(e.sqlstate).to eq("08001")
      }
  end

  it "commits a transaction block and rolls back on an exception" do
    conn.exec("CREATE TEMP TABLE t (x int)")
    conn.transaction { conn.exec("INSERT INTO t VALUES (1)") }
    expect { conn.transaction { conn.exec("INSERT INTO t VALUES (2)"); raise "boom" } }.to raise_error("boom")
    expect(conn.exec("SELECT array_agg(x) AS xs FROM t").first["xs"]).to eq([1])
    expect(conn.in_transaction?).to be(false)
  end

  it "runs scripts of several statements" do
    conn.exec_script("CREATE TEMP TABLE s (x int); INSERT INTO s VALUES (7);")
    expect(conn.exec("SELECT x FROM s")).to eq([{ "x" => 7 }])
  end

  describe "interrupting a query" do
    def in_flight?(pid)
      connect.exec("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", [pid])
             .first["n"].positive?
    end

    it "stops waiting on Thread#raise, cancels the query and stays usable" do
      backend = conn.exec("SELECT pg_backend_pid() AS p").first["p"]
      t = Thread.new { Thread.current.report_on_exception = false; conn.exec("SELECT pg_sleep(10)") }
      wait_until(message: "the query to run") { in_flight?(backend) }
      t.raise(Interrupt, "stop")
      expect { t.join }.to raise_error(Interrupt)
      expect(conn.exec("SELECT 1 AS one")).to eq([{ "one" => 1 }])
      expect(in_flight?(backend)).to be(false)
    end

    it "is interrupted by Timeout" do
      expect { Timeout.timeout(0.2) { conn.exec("SELECT pg_sleep(10)") } }.to raise_error(Timeout::Error)
      expect(conn.exec("SELECT 3 AS x")).to eq([{ "x" => 3 }])
    end

    it "lets another thread run while it waits" do
      backend = conn.exec("SELECT pg_backend_pid() AS p").first["p"]
      waiter = Thread.new { Thread.current.report_on_exception = false; conn.exec("SELECT pg_sleep(10)") }
      wait_until(message: "the query to run") { in_flight?(backend) }
      counter = 0
      counter += 1 while counter < 1000
      expect(waiter).to be_alive # the other thread's CPU work finished while the query still ran
      waiter.raise(Interrupt)
      expect { waiter.join }.to raise_error(Interrupt)
      expect(counter).to eq(1000)
    end
  end

  it "refuses use from a second thread while a query runs" do
    backend = conn.exec("SELECT pg_backend_pid() AS p").first["p"]
    t = Thread.new { Thread.current.report_on_exception = false; conn.exec("SELECT pg_sleep(10)") }
    wait_until(message: "the query to run") do
      connect.exec("SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", [backend]).any?
    end
    expect { conn.exec("SELECT 1") }.to raise_error(TaskerCore::StoreError, /another thread/)
    t.raise(Interrupt)
    expect { t.join }.to raise_error(Interrupt)
  end

  it "refuses use in a forked child and leaves the parent's session alone" do
    conn.exec("SELECT 1")
    reader, writer = IO.pipe
    pid = fork do
      reader.close
      begin
        conn.exec("SELECT 1")
        writer.write("used")
      rescue TaskerCore::ForkSafetyError => e
        writer.write("refused: #{e.message}")
      end
      GC.start # discarding the inherited connection must not close the parent's session
      writer.close
      exit!(0)
    end
    writer.close
    Process.wait(pid)
    expect(reader.read).to start_with("refused:")
    expect(conn.exec("SELECT 5 AS x")).to eq([{ "x" => 5 }])
  end

  it "raises ClosedError after #close, which is idempotent" do
    conn.close
    conn.close
    expect(conn.closed?).to be(true)
    expect { conn.exec("SELECT 1") }.to raise_error(TaskerCore::ClosedError)
  end
end
