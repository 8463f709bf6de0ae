# frozen_string_literal: true

require "json"
require_relative "../fixtures/durable_handlers"
require_relative "../fixtures/fault_handlers"

# Connection churn (issue 10): peers that connect and leave by the thousand,
# on both endpoints, cost the orchestrator nothing but the connections. It
# used to freeze: every socket carried a libzmq monitor that nobody drained,
# its inproc queue filled after a few hundred connections and libzmq's I/O
# thread blocked for good sending the next event.
RSpec.describe "connection churn", :db, :no_valgrind do
  CHURN_PYTHON = ["/usr/bin/python3", "python3"].find do |candidate|
    system(candidate, "-c", "import zmq", out: File::NULL, err: File::NULL)
  end

  # One endpoint's churn: `raw` plain TCP connect/close, and `zmtp` libzmq
  # peers (SUB on the batch endpoint, PUB on the result endpoint) that each
  # complete a ZMTP handshake (seen on their own monitor) and then leave,
  # `parallel` at a time. Prints its counts as JSON. A round whose
  # handshakes do not complete within 10 s ends the run (the orchestrator
  # stopped accepting): fails fast instead of timing out.
  CHURN_SCRIPT = <<~PY
    import json, socket, sys, time, zmq
    from zmq.utils.monitor import recv_monitor_message
    endpoint, kind, raw_n, zmtp_n, par = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    ctx = zmq.Context()
    EV = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL |
          zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    st = {"raw": 0, "raw_failed": 0, "zmtp": 0, "zmtp_failed": 0, "zmtp_timed_out": 0}
    rounds = max(1, -(-zmtp_n // par))
    raw_per_round = -(-raw_n // rounds)
    started = 0
    while started < zmtp_n or st["raw"] + st["raw_failed"] < raw_n:
        peers = {}
        for _ in range(min(par, zmtp_n - started)):
            s = ctx.socket(zmq.SUB if kind == "sub" else zmq.PUB)
            s.setsockopt(zmq.LINGER, 0)
            mon = s.get_monitor_socket(EV)
            if kind == "sub":
                s.setsockopt(zmq.SUBSCRIBE, b"batch.churn-%d." % started)
            s.connect(endpoint)
            peers[mon] = s
            started += 1
        for _ in range(min(raw_per_round, raw_n - st["raw"] - st["raw_failed"])):
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
                st["raw"] += 1
            except OSError:
                st["raw_failed"] += 1
        poller = zmq.Poller()
        for mon in peers:
            poller.register(mon, zmq.POLLIN)
        pending = set(peers)
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            for mon, _ in poller.poll(100):
                ev = recv_monitor_message(mon)["event"]
                if mon in pending:
                    pending.discard(mon)
                    st["zmtp" if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED else "zmtp_failed"] += 1
        st["zmtp_timed_out"] += len(pending)
        for mon, s in peers.items():
            s.disable_monitor()
            mon.close(0)
            s.close(0)
        if pending:
            break
    print(json.dumps(st), flush=True)
    ctx.term()
  PY

  let(:conn) { connect }

  before { skip "no python3 with pyzmq" unless CHURN_PYTHON }

  after { cleanup_durable }

  def slow(name, deps = [], sleep_ms: 50)
    step(name, deps, handler: "DurableHandlers::Slow", handler_config: { "sleep_ms" => sleep_ms })
  end

  def spawn_churn(endpoint, kind, raw:, zmtp:, parallel:)
    r, w = IO.pipe
    pid = Process.spawn(CHURN_PYTHON, "-c", CHURN_SCRIPT, endpoint, kind, raw.to_s, zmtp.to_s, parallel.to_s, out: w, pgroup: true)
    w.close
    (@spawned_pids ||= []) << pid
    [pid, r]
  end

  it "keeps running through 10,000 raw TCP and 10,000 ZMTP connections on each endpoint" do
    use_templates(template("pair", [slow("a"), slow("b", ["a"])]))
    batch_ep = tcp_endpoint
    result_ep = tcp_endpoint
    orch = spawn_orchestrator_process(batch_ep, result_ep)
    2.times { spawn_fault_worker(batch_ep, result_ep) }
    ids = Array.new(40) { |i| TaskerCore.create_task(name: "pair", context: { "n" => i }) }

    churn = { batch: spawn_churn(batch_ep, "sub", raw: 10_000, zmtp: 10_000, parallel: 50),
              result: spawn_churn(result_ep, "pub", raw: 10_000, zmtp: 10_000, parallel: 50) }
    counts = {}
    # Tasks keep arriving while the churn runs, so work is in flight throughout.
    wait_until(timeout: 180, interval: 0.5, message: "the churn to finish") do
      ids << TaskerCore.create_task(name: "pair", context: { "n" => ids.size })
      churn.each do |name, (pid, out)|
        next if counts.key?(name) || Process.wait(pid, Process::WNOHANG).nil?

        @spawned_pids.delete(pid)
        counts[name] = JSON.parse(out.read.to_s.lines.last || "{}")
      end
      counts.size == churn.size
    end

    full = { "raw" => 10_000, "raw_failed" => 0, "zmtp" => 10_000, "zmtp_failed" => 0, "zmtp_timed_out" => 0 }
    expect(counts).to eq(batch: full, result: full)
    expect_finished_exactly_once(ids)
    expect_live_after_fault(orch, template_name: "pair")
  end
end
