# frozen_string_literal: true

require "tmpdir"

RSpec.describe TaskerCore::Socket do
  include SocketHelpers

  # A connected publisher/subscriber pair whose subscription has reached
  # the publisher, so nothing sent afterwards is lost to a slow join.
  def pair(endpoint = "tcp://127.0.0.1:*", topics: [""], pub_opts: {}, sub_opts: {})
    pub = track(TaskerCore::Socket::Publisher.new(bind: endpoint, **pub_opts))
    sub = track(TaskerCore::Socket::Subscriber.new(connect: pub.last_endpoint, topics: topics, **sub_opts))
    await_subscriptions(pub, topics.size)
    [pub, sub]
  end

  describe "multipart round trip" do
    it "delivers every frame of a message intact, as binary strings" do
      pub, sub = pair
      body = "\x00\xFFbinary\x00".b
      expect(pub.send_parts(["topic.a", body, "third"])).to be(true)

      msg = sub.receive(timeout_ms: 10_000)
      expect(msg).to eq(["topic.a", body, "third"])
      expect(msg.map(&:encoding).uniq).to eq([Encoding::BINARY])
    end

    it "sends a topic and a body with send_message and counts messages and bytes" do
      pub, sub = pair
      expect(pub.send_message("t", "hello")).to be(true)
      expect(sub.receive(timeout_ms: 10_000)).to eq(%w[t hello])

      expect(pub.stats).to include(messages_sent: 1, bytes_sent: 6, send_dropped: 0)
      expect(sub.stats).to include(messages_received: 1, bytes_received: 6, messages_sent: 0)
    end

    {
      "tcp" => ->(_dir) { "tcp://127.0.0.1:*" },
      "ipc" => ->(dir) { "ipc://#{dir}/pub.sock" },
      "inproc" => ->(_dir) { "inproc://round-trip-#{rand(1 << 30)}" }
    }.each do |transport, endpoint_for|
      it "works over #{transport}" do
        Dir.mktmpdir("tc-sock") do |dir|
          pub, sub = pair(endpoint_for.call(dir))
          expect(pub.last_endpoint).to start_with("#{transport}://")
          pub.send_message("x", transport)
          expect(sub.receive(timeout_ms: 10_000)).to eq(["x", transport])
          pub.close
          sub.close
        end
      end
    end

    it "reports the port actually bound for tcp://...:*" do
      pub = track(TaskerCore::Socket::Publisher.new(bind: "tcp://127.0.0.1:*"))
      expect(pub.last_endpoint).to match(%r{\Atcp://127\.0\.0\.1:\d+\z})
      expect(pub.last_endpoint).not_to end_with(":0")
    end

    it "binds to a port chosen free at run time" do
      endpoint = tcp_endpoint
      pub = track(TaskerCore::Socket::Publisher.new(bind: endpoint))
      expect(pub.last_endpoint).to eq(endpoint)
    end
  end

  describe "topics" do
    it "delivers only messages whose topic starts with a subscribed prefix" do
      pub, sub = pair(topics: ["batch.a."])
      pub.send_message("batch.b.", "not for a")
      pub.send_message("batch.ab", "not for a either")
      pub.send_message("batch.a.", "for a")

      # One pipe keeps order: had the filter let others through, they would come first.
      expect(sub.receive(timeout_ms: 10_000)).to eq(["batch.a.", "for a"])
      expect(sub.receive(timeout_ms: 0)).to be_nil
    end

    it "stops delivering a topic after unsubscribe" do
      pub, sub = pair(topics: %w[keep. drop.])
      sub.unsubscribe("drop.")
      seen = []
      wait_until(message: "unsubscription") do
        seen.concat(pub.subscriptions(timeout_ms: 100))
        seen.include?([:unsubscribe, "drop."])
      end
      pub.send_message("drop.", "1")
      pub.send_message("keep.", "2")
      expect(sub.receive(timeout_ms: 10_000)).to eq(%w[keep. 2])
    end

    it "lets the publisher see subscriptions and unsubscriptions arrive" do
      pub = track(TaskerCore::Socket::Publisher.new(bind: "tcp://127.0.0.1:*"))
      expect(pub.subscriptions).to eq([])

      sub = track(TaskerCore::Socket::Subscriber.new(connect: pub.last_endpoint, topics: ["batch.w1."]))
      seen = await_subscriptions(pub, 1, topic: "batch.w1.")
      expect(seen).to include([:subscribe, "batch.w1."])

      sub.subscribe("batch.w2.")
      sub.unsubscribe("batch.w1.")
      seen = []
      wait_until(message: "both changes") do
        seen.concat(pub.subscriptions(timeout_ms: 100))
        seen.include?([:unsubscribe, "batch.w1."]) && seen.include?([:subscribe, "batch.w2."])
      end
      expect(seen.index([:subscribe, "batch.w2."])).to be < seen.index([:unsubscribe, "batch.w1."])
    end

    it "sees every subscriber's subscription, even to the same topic" do
      pub = track(TaskerCore::Socket::Publisher.new(bind: "inproc://same-topic-#{rand(1 << 30)}"))
      2.times { track(TaskerCore::Socket::Subscriber.new(connect: pub.last_endpoint, topics: ["t"])) }
      expect(await_subscriptions(pub, 2, topic: "t").count([:subscribe, "t"])).to eq(2)
    end
  end

  describe "receive_many" do
    it "waits for the first message, then drains what is ready up to max" do
      pub, sub = pair("inproc://many-#{rand(1 << 30)}")
      # inproc writes straight into the subscriber's pipe: all five are ready.
      5.times { |i| pub.send_message("t", i.to_s) }

      expect(sub.receive_many(max: 3, timeout_ms: 10_000)).to eq([%w[t 0], %w[t 1], %w[t 2]])
      expect(sub.receive_many(max: 10, timeout_ms: 0)).to eq([%w[t 3], %w[t 4]])
      expect(sub.receive_many(timeout_ms: 0)).to eq([])
    end

    it "returns [] and receive returns nil on timeout" do
      _pub, sub = pair
      expect(sub.receive_many(timeout_ms: 20)).to eq([])
      expect(sub.receive(timeout_ms: 20)).to be_nil
    end

    it "rejects a negative timeout" do
      _pub, sub = pair
      expect { sub.receive(timeout_ms: -1) }.to raise_error(ArgumentError, /timeout_ms/)
    end
  end

  describe "high-water mark" do
    it "refuses and counts sends to a subscriber that does not read (inproc)" do
      pub, _sub = pair("inproc://hwm-#{rand(1 << 30)}", pub_opts: { send_hwm: 1 }, sub_opts: { recv_hwm: 1 })
      expect(pub.send_hwm).to eq(1)

      results = Array.new(50) { |i| pub.send_message("t", i.to_s) }
      refused = results.count(false)
      expect(refused).to be > 0
      expect(pub.stats[:send_dropped]).to eq(refused)
      expect(pub.stats[:messages_sent]).to eq(50 - refused)
    end

    it "refuses and counts sends once tcp buffers are full" do
      pub, _sub = pair(pub_opts: { send_hwm: 1 }, sub_opts: { recv_hwm: 1 })
      body = "x" * (256 * 1024)
      sent = 0
      refused = nil
      2_000.times do
        break if (refused = !pub.send_message("t", body))

        sent += 1
      end
      expect(refused).to be(true)
      expect(pub.stats[:send_dropped]).to eq(1)
      expect(pub.stats[:messages_sent]).to eq(sent)
    end
  end

  describe "linger" do
    it "defaults to 0 and can be set" do
      pub = track(TaskerCore::Socket::Publisher.new)
      expect(pub.linger).to eq(0)
      pub.linger = 250
      expect(pub.linger).to eq(250)
    end

    it "still delivers queued messages after the publisher closes with linger > 0" do
      pub, sub = pair(pub_opts: { linger: 10_000 })
      count = stress? ? 20 : 200
      body = "y" * 16_384
      count.times { |i| expect(pub.send_message("t", "#{i}:#{body}")).to be(true) }
      pub.close

      got = []
      while got.size < count
        batch = sub.receive_many(timeout_ms: 10_000)
        break if batch.empty?

        got.concat(batch)
      end
      expect(got.map { |(_, b)| b.split(":").first.to_i }).to eq((0...count).to_a)
    end
  end

  describe "endpoint errors" do
    it "names the endpoint when the address is in use" do
      endpoint = track(TaskerCore::Socket::Publisher.new(bind: "tcp://127.0.0.1:*")).last_endpoint
      expect { TaskerCore::Socket::Publisher.new(bind: endpoint) }
        .to raise_error(TaskerCore::ConnectionError, /#{Regexp.escape(endpoint)}.*in use/)
    end

    it "names the endpoint when an inproc name is taken" do
      endpoint = "inproc://taken-#{rand(1 << 30)}"
      track(TaskerCore::Socket::Publisher.new(bind: endpoint))
      expect { TaskerCore::Socket::Subscriber.new(bind: endpoint) }.to raise_error(TaskerCore::ConnectionError, /#{endpoint}/)
    end

    it "names a malformed endpoint" do
      sub = track(TaskerCore::Socket::Subscriber.new)
      expect { sub.bind("tcp://127.0.0.1") }
        .to raise_error(TaskerCore::ConnectionError, %r{tcp://127\.0\.0\.1: Invalid argument})
      expect { sub.connect("no endpoint here") }
        .to raise_error(TaskerCore::ConnectionError, /no endpoint here/)
    end

    it "names an unknown transport" do
      expect { TaskerCore::Socket::Subscriber.new(connect: "carrier-pigeon://loft") }
        .to raise_error(TaskerCore::ConnectionError, %r{carrier-pigeon://loft: Protocol not supported})
    end

    it "reports the real errno of a failed bind, with or without a monitor" do
      [false, true].each do |monitor|
        pub = track(TaskerCore::Socket::Publisher.new(monitor: monitor))
        expect { pub.bind("ipc:///nonexistent-dir-#{rand(1 << 30)}/x") }
          .to raise_error(TaskerCore::ConnectionError, /No such file or directory/)
        expect(pub.events.map { |e| e[:event] }).not_to include(:bind_failed) # not a connection event
      end
    end
  end

  describe "events" do
    it "has no monitor and no events unless asked for one" do
      pub = track(TaskerCore::Socket::Publisher.new(bind: "tcp://127.0.0.1:*"))
      sub = track(TaskerCore::Socket::Subscriber.new(connect: pub.last_endpoint))
      await_subscriptions(pub)
      expect([pub, sub].map(&:monitored?)).to eq([false, false])
      expect(pub.events + sub.events).to eq([])
    end

    it "reports connected, handshake_succeeded and disconnected with the endpoint, and nothing else" do
      pub = track(TaskerCore::Socket::Publisher.new(bind: "tcp://127.0.0.1:*", monitor: true))
      endpoint = pub.last_endpoint
      expect(pub).to be_monitored

      sub = track(TaskerCore::Socket::Subscriber.new(connect: endpoint, monitor: true))
      sub_events = await_event(sub, :handshake_succeeded, endpoint: endpoint)
      pub_events = await_event(pub, :handshake_succeeded)
      await_subscriptions(pub)
      expect(sub_events.map { |e| e[:event] }).to include(:connected)
      expect(sub_events.first[:at]).to be_a(Time)

      sub.close
      await_event(pub, :disconnected, seen: pub_events)
      kinds = (pub_events + sub_events).map { |e| e[:event] }.uniq
      expect(kinds - %i[connected disconnected closed handshake_succeeded]).to eq([])
    end

    it "never holds up libzmq's I/O thread when nobody reads the events: keeps the newest and counts the rest" do
      pub = track(TaskerCore::Socket::Publisher.new(bind: "tcp://127.0.0.1:*", monitor: true))
      endpoint = pub.last_endpoint
      # Each TCP connect/close is 2 or more events on the monitored binder;
      # libzmq's own pipe would take about 2000 before blocking its I/O
      # thread for good.
      port = Integer(endpoint[/\d+\z/])
      (stress? ? 50 : 1500).times { TCPSocket.new("127.0.0.1", port).close }
      probe = track(TaskerCore::Socket::Subscriber.new(connect: endpoint, topics: ["probe"]))
      await_subscriptions(pub, topic: "probe")
      pub.send_message("probe", "still served")
      expect(probe.receive(timeout_ms: 10_000)).to eq(["probe", "still served"])
      unless stress?
        wait_until(timeout: 30, message: "events overwritten") do
          pub.subscriptions(timeout_ms: 10) # polling drains the monitor into its ring
          pub.stats[:events_dropped].positive?
        end
      end
      expect(pub.events.size).to be <= 64
    end
  end

  describe "close" do
    it "is idempotent and makes every later use raise ClosedError" do
      pub, sub = pair
      pub.send_message("t", "before close")
      expect(sub.receive(timeout_ms: 10_000)).to eq(["t", "before close"])

      expect(sub.close).to be_nil
      expect(sub.close).to be_nil
      expect(sub).to be_closed
      expect { sub.receive(timeout_ms: 0) }.to raise_error(TaskerCore::ClosedError, /closed/)
      expect { sub.subscribe("x") }.to raise_error(TaskerCore::ClosedError)
      expect { sub.events }.to raise_error(TaskerCore::ClosedError)
      expect { sub.fd }.to raise_error(TaskerCore::ClosedError)
      expect(sub.stats[:messages_received]).to eq(1)

      pub.close
      expect { pub.send_message("t", "x") }.to raise_error(TaskerCore::ClosedError)
      expect { pub.bind("tcp://127.0.0.1:*") }.to raise_error(TaskerCore::ClosedError)
      expect(TaskerCore::ClosedError.ancestors).to include(TaskerCore::ConnectionError)
    end

    it "cannot be copied" do
      sub = track(TaskerCore::Socket::Subscriber.new)
      expect { sub.dup }.to raise_error(TypeError, /can't copy/)
      expect { sub.clone }.to raise_error(TypeError, /can't copy/)
    end

    it "leaves sockets dropped without close to the GC, and later sockets still connect" do
      endpoint = track(TaskerCore::Socket::Publisher.new(bind: "tcp://127.0.0.1:*")).last_endpoint
      (stress? ? 2 : 10).times { TaskerCore::Socket::Subscriber.new(connect: endpoint, monitor: true) }
      GC.start

      pub, sub = pair(sub_opts: { monitor: true })
      await_event(sub, :connected, endpoint: pub.last_endpoint)
      pub.send_message("t", "after gc")
      expect(sub.receive(timeout_ms: 10_000)).to eq(["t", "after gc"])
    end

    it "exposes ZMQ_FD as an Integer while open" do
      expect(track(TaskerCore::Socket::Subscriber.new).fd).to be_a(Integer).and(be >= 0)
    end
  end

  describe "TaskerCore::Socket.select" do
    it "returns the readable subset of sockets and IO objects" do
      pub, sub = pair
      r, w = IO.pipe
      expect(described_class.select([sub, r], 0)).to eq([])

      w.write("x")
      expect(described_class.select([sub, r], 10_000)).to eq([r])
      r.read(1)

      pub.send_message("t", "m")
      expect(described_class.select([r, sub], 10_000)).to eq([sub])
      expect(sub.receive(timeout_ms: 0)).to eq(%w[t m])
      expect(described_class.select([sub, r], 20)).to eq([])
    ensure
      r&.close
      w&.close
    end

    it "counts IO input already buffered in Ruby as readable" do
      r, w = IO.pipe
      w.write("line one\nline two\n")
      expect(r.gets).to eq("line one\n") # the rest now sits in r's buffer
      expect(described_class.select([r], 0)).to eq([r])
    ensure
      r&.close
      w&.close
    end
  end
end
