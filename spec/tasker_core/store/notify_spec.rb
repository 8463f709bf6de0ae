# frozen_string_literal: true

RSpec.describe "TaskerCore::Store::Connection#wait_for_notify", :db do
  let(:listener) { connect.tap { |c| c.exec("LISTEN tc_spec") } }
  let(:sender) { connect }

  it "returns a notification sent after the wait began, with channel, payload and the sender's pid" do
    listener
    waiter = Thread.new { listener.wait_for_notify(10) }
    wait_until { waiter.status == "sleep" }
    sender_pid = sender.exec("SELECT pg_backend_pid() AS p").first["p"]
    sender.exec("SELECT pg_notify('tc_spec', 'hello')")
    expect(waiter.value).to eq(["tc_spec", "hello", sender_pid])
  end

  it "returns notifications an earlier query already read, in order, without waiting" do
    listener
    sender.exec("SELECT pg_notify('tc_spec', '1'), pg_notify('tc_spec', '2')")
    listener.exec("SELECT 1") # reads both off the socket
    expect(listener.wait_for_notify(0)).to match(["tc_spec", "1", Integer])
    expect(listener.wait_for_notify(0)).to match(["tc_spec", "2", Integer])
    expect(listener.wait_for_notify(0)).to be_nil
  end

  it "returns nil on timeout and leaves the connection usable" do
    expect(listener.wait_for_notify(0.05)).to be_nil
    expect(listener.exec("SELECT 2 AS x").first["x"]).to eq(2)
  end

  it "does not hold the GVL while waiting" do
    listener
    waiter = Thread.new { listener.wait_for_notify(10) }
    counter = 0
    spinner = Thread.new { 200_000.times { counter += 1 } }
    spinner.join
    expect(waiter).to be_alive
    expect(counter).to eq(200_000)
    waiter.kill.join
  end

  it "is interrupted by Thread#kill and Thread#raise, and the connection stays usable" do
    listener
    waiter = Thread.new { listener.wait_for_notify(nil) }
    wait_until { waiter.status == "sleep" }
    waiter.raise(RuntimeError, "stop")
    expect { waiter.join }.to raise_error(RuntimeError, "stop")
    sender.exec("SELECT pg_notify('tc_spec', 'after')")
    expect(listener.wait_for_notify(10)).to match(["tc_spec", "after", Integer])
  end

  it "raises StoreError when the server ends the session" do
    listener
    pid = listener.exec("SELECT pg_backend_pid() AS p").first["p"]
    sender.exec("SELECT pg_terminate_backend($1)", [pid])
    expect { listener.wait_for_notify(10) }.to raise_error(TaskerCore::StoreError, /notification/)
  end

  it "refuses a closed connection" do
    listener.close
    expect { listener.wait_for_notify(0) }.to raise_error(TaskerCore::ClosedError)
  end
end
