# frozen_string_literal: true

# Helpers for the socket specs.
module SocketHelpers

  # Smaller loops under GC.stress, where every allocation runs the GC.
  def stress?
    ENV["TASKER_CORE_GC_STRESS"] == "1"
  end

  # Drains pub's subscriptions until `count` subscribe messages (for
  # `topic`, if given) have been seen; returns everything seen.
  def await_subscriptions(pub, count = 1, topic: nil, seen: [])
    wait_until(message: "#{count} subscription(s)") do
      seen.concat(pub.subscriptions(timeout_ms: 100))
      seen.count { |kind, t| kind == :subscribe && (topic.nil? || t == topic) } >= count
    end
    seen
  end

  # Collects socket events until one of `kind` (for `endpoint`, if given) shows up.
  def await_event(sock, kind, endpoint: nil, seen: [])
    wait_until(message: "#{kind} event (seen so far: #{seen.map { |e| e[:event] }})") do
      seen.concat(sock.events)
      seen.any? { |e| e[:event] == kind && (endpoint.nil? || e[:endpoint] == endpoint) }
    end
    seen
  end

  def tracked_sockets
    @tracked_sockets ||= []
  end

  # A socket that is closed after the example.
  def track(sock)
    tracked_sockets << sock
    sock
  end

  def self.included(base)
    base.after do
      tracked_sockets.each do |s|
        s.close
      rescue TaskerCore::ConnectionError
        nil # owned by a thread that is still running; the GC closes it
      end
    end
  end
end
