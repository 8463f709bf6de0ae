# frozen_string_literal: true

# Shared by the ActiveJob peers of the end-to-end benchmark (bench/goodjob,
# bench/solidqueue), each loading it inside its own bundle after its Rails
# application has initialized: the no-op job, and the enqueuer's protocol
# with bench/lib/e2e.rb on stdin/stdout:
#   prints "ready" (the caller has put its schema in place);
#   "enqueue N" enqueues N jobs, 1,000 per call of the block given to serve
#   (each its own transaction, as Sidekiq's push_bulk slices), then prints "enqueued";
#   end of stdin returns.

class BenchNoopJob < ActiveJob::Base
  queue_as :bench

  def perform; end
end

module ActiveJobPeer
  CHUNK = 1000

  def self.serve(input: $stdin, output: $stdout)
    output.sync = true
    output.puts "ready"
    while (line = input.gets)
      cmd, n = line.split
      next unless cmd == "enqueue"

      left = Integer(n)
      while left.positive?
        k = [left, CHUNK].min
        yield k
        left -= k
      end
      output.puts "enqueued"
    end
  end
end
