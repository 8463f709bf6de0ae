# frozen_string_literal: true

# Waiting without the GVL, interrupts, and one-thread ownership.
RSpec.describe TaskerCore::Socket, "with threads" do
  include SocketHelpers

  let(:interrupt_class) { Class.new(StandardError) }

  # Starts a thread that makes its own subscriber (a socket belongs to the
  # thread that made it) and blocks in `receive`; returns once it waits.
  def blocked_receiver(endpoint, &on_exit)
    ready = Queue.new
    thread = Thread.new do
      Thread.current.report_on_exception = false
      sub = TaskerCore::Socket::Subscriber.new(connect: endpoint)
      ready << sub
      sub.receive
    ensure
      on_exit&.call
      sub&.close
    end
    ready.pop
    wait_until(message: "receiver to block") { thread.status == "sleep" }
    thread
  end

  let(:endpoint) { track(TaskerCore::Socket::Publisher.new(bind: "tcp://127.0.0.1:*")).last_endpoint }

  it "stops a blocked receive on Thread#raise" do
    thread = blocked_receiver(endpoint)
    thread.raise(interrupt_class, "stop now")
    expect { thread.value }.to raise_error(interrupt_class, "stop now")
  end

  it "stops a blocked receive on Thread#kill, running ensure blocks" do
    cleaned = Queue.new
    thread = blocked_receiver(endpoint) { cleaned << :ensure_ran }
    thread.kill
    expect(thread.join(30)).to eq(thread)
    expect(thread).not_to be_alive
    expect(cleaned.pop).to eq(:ensure_ran)
  end

  it "stops a blocked receive on Timeout.timeout" do
    sub = track(TaskerCore::Socket::Subscriber.new(connect: endpoint))
    expect { Timeout.timeout(0.2) { sub.receive } }.to raise_error(Timeout::Error)
    expect(sub.receive(timeout_ms: 0)).to be_nil # still usable afterwards
  end

  it "stops a blocked select on Timeout.timeout" do
    sub = track(TaskerCore::Socket::Subscriber.new(connect: endpoint))
    r, w = IO.pipe
    expect { Timeout.timeout(0.2) { described_class.select([sub, r], nil) } }.to raise_error(Timeout::Error)
  ensure
    r&.close
    w&.close
  end

  it "lets other threads run while a receive waits" do
    sub = track(TaskerCore::Socket::Subscriber.new(connect: endpoint))
    counter = 0
    started = Queue.new
    spinner = Thread.new do
      started << true
      loop { counter += 1 }
    end
    started.pop
    before = counter
    expect(sub.receive(timeout_ms: 300)).to be_nil
    after = counter
    spinner.kill.join
    expect(after).to be > before
  end

  it "wakes a select waiting on a socket and a pipe when the pipe is written" do
    r, w = IO.pipe
    ready = Queue.new
    ep = endpoint
    waiter = Thread.new do
      sub = TaskerCore::Socket::Subscriber.new(connect: ep)
      ready << true
      described_class.select([sub, r], nil).tap { sub.close }
    end
    ready.pop
    wait_until(message: "select to block") { waiter.status == "sleep" }
    w.write("wake")
    expect(waiter.value).to eq([r])
  ensure
    r&.close
    w&.close
  end

  it "raises ThreadOwnershipError when another thread uses a socket" do
    sub = track(TaskerCore::Socket::Subscriber.new(connect: endpoint))
    errors = Thread.new do
      [-> { sub.receive(timeout_ms: 0) }, -> { sub.subscribe("x") }, -> { sub.close },
       -> { described_class.select([sub], 0) }].map do |use|
        use.call
        nil
      rescue TaskerCore::ThreadOwnershipError => e
        e
      end
    end.value
    expect(errors).to all(be_a(TaskerCore::ThreadOwnershipError))
    expect(errors.first.message).to match(/belongs to .*Thread/)
    expect(sub).not_to be_closed
    expect(sub.receive(timeout_ms: 0)).to be_nil # the owner still can
  end

  it "lets a socket whose thread has ended be taken over" do
    sub = Thread.new { TaskerCore::Socket::Subscriber.new(connect: endpoint) }.value
    track(sub)
    expect(sub.receive(timeout_ms: 0)).to be_nil
    expect { sub.close }.not_to raise_error
  end
end
