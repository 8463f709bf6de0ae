# frozen_string_literal: true

# Sockets across processes: fan-out to child processes, fork safety, Ctrl-C.
RSpec.describe TaskerCore::Socket, "across processes" do
  include SocketHelpers

  # Reads `count` lines a child wrote to `io`, failing instead of hanging.
  def read_lines(io, count)
    Timeout.timeout(30) { Array.new(count) { io.gets&.chomp } }
  end

  # :no_valgrind on the examples that spawn Ruby: what runs under valgrind
  # is this process, and a child killed after the example proves nothing
  # there. The fork examples stay in.
  it "fans one message out to three subscribers in separate processes", :no_valgrind do
    pub = track(TaskerCore::Socket::Publisher.new(bind: "tcp://127.0.0.1:*"))
    r, w = IO.pipe
    child = <<~RUBY
      require "tasker_core"
      sub = TaskerCore::Socket::Subscriber.new(connect: ARGV[0], topics: ["fan."])
      msg = sub.receive(timeout_ms: 30_000)
      $stdout.puts([Process.pid, *msg].join(" "))
      $stdout.flush
    RUBY
    pids = Array.new(3) { spawn_ruby(child, pub.last_endpoint, out: w) }
    w.close

    # No sleeping for slow joiners: publish once all three have subscribed.
    await_subscriptions(pub, 3, topic: "fan.")
    expect(pub.send_message("fan.all", "hello children")).to be(true)

    lines = read_lines(r, 3)
    expect(lines.map { |l| l.split(" ", 2).last }).to all(eq("fan.all hello children"))
    expect(lines.map { |l| l.split.first.to_i }).to match_array(pids)
  ensure
    r&.close
  end

  it "raises Interrupt in a process blocked in receive when it gets SIGINT", :no_valgrind do
    pub = track(TaskerCore::Socket::Publisher.new(bind: "tcp://127.0.0.1:*"))
    r, w = IO.pipe
    child = <<~RUBY
      require "tasker_core"
      sub = TaskerCore::Socket::Subscriber.new(connect: ARGV[0])
      $stdout.puts "waiting"; $stdout.flush
      begin
        sub.receive
        $stdout.puts "returned"
      rescue Interrupt
        $stdout.puts "interrupted"
      end
      $stdout.flush
    RUBY
    pid = spawn_ruby(child, pub.last_endpoint, out: w)
    w.close
    expect(read_lines(r, 1)).to eq(["waiting"])
    await_subscriptions(pub) # the child is in receive or about to be
    Process.kill(:INT, pid)
    expect(read_lines(r, 1)).to eq(["interrupted"])
    _, status = Process.wait2(pid)
    expect(status).to be_success
  ensure
    r&.close
  end

  describe "fork", :forks do
    it "refuses the parent's sockets in the child, allows new ones, and leaves the parent's working" do
      pub = TaskerCore::Socket::Publisher.new(bind: "tcp://127.0.0.1:*")
      sub = TaskerCore::Socket::Subscriber.new(connect: pub.last_endpoint)
      track(pub)
      track(sub)
      await_subscriptions(pub)
      pub.send_message("t", "before fork")
      expect(sub.receive(timeout_ms: 10_000)).to eq(["t", "before fork"])
      # Garbage the child's GC will collect: it must discard, not close.
      3.times { TaskerCore::Socket::Subscriber.new(connect: pub.last_endpoint) }

      r, w = IO.pipe
      pid = fork do
        r.close
        report = {}
        begin
          pub.send_message("t", "from child")
        rescue TaskerCore::ForkSafetyError => e
          report[:send] = e.class.name
        end
        begin
          sub.receive(timeout_ms: 0)
        rescue TaskerCore::ForkSafetyError => e
          report[:receive] = e.class.name
        end
        fresh_pub = TaskerCore::Socket::Publisher.new(bind: "inproc://child")
        fresh_sub = TaskerCore::Socket::Subscriber.new(connect: "inproc://child")
        fresh_pub.subscriptions(timeout_ms: 10_000)
        fresh_pub.send_message("c", "child ok")
        report[:fresh] = fresh_sub.receive(timeout_ms: 10_000)
        # fresh_* stay open: exit! below skips finalizers, and closing them
        # would leave libzmq's I/O thread mid-work when the process ends.
        sub.close # only forgets the parent's socket
        report[:closed] = sub.closed?
        pub = sub = nil
        GC.start
        w.write(Marshal.dump(report))
        w.close
        exit!(0)
      rescue Exception => e # rubocop:disable Lint/RescueException
        w.write(Marshal.dump(error: "#{e.class}: #{e.message}"))
        exit!(1)
      end
      w.close
      report = Marshal.load(Timeout.timeout(30) { r.read }) # rubocop:disable Security/MarshalLoad
      _, status = Process.wait2(pid)

      expect(report).to eq(send: "TaskerCore::ForkSafetyError", receive: "TaskerCore::ForkSafetyError",
                           fresh: ["c", "child ok"], closed: true)
      expect(status).to be_success

      GC.start
      expect(sub).not_to be_closed
      pub.send_message("t", "after child")
      expect(sub.receive(timeout_ms: 10_000)).to eq(["t", "after child"])
    ensure
      r&.close
    end

    it "names the process in the ForkSafetyError" do
      sub = track(TaskerCore::Socket::Subscriber.new)
      r, w = IO.pipe
      pid = fork do
        begin
          sub.subscribe("x")
        rescue TaskerCore::ForkSafetyError => e
          w.write(e.message)
        end
        exit!(0)
      end
      w.close
      message = Timeout.timeout(30) { r.read }
      Process.wait(pid)
      expect(message).to include("process #{Process.pid}", "after fork")
    ensure
      r&.close
    end
  end
end
