# frozen_string_literal: true

# The ActiveJob-on-tasker_core side of the end-to-end benchmark's driver:
# applies tasker_core's schema, then enqueues no-op jobs through the
# adapter's enqueue_all (one statement per 1,000 jobs, as GoodJob::Bulk) on
# request (protocol: bench/lib/activejob_peer.rb).
#
#   cd bench/activejob_tasker && BUNDLE_GEMFILE=Gemfile RUBYOPT=-rbundler/setup DATABASE_URL=... ruby enqueuer.rb
require_relative "config/environment"

TaskerCore::Store.migrate!(ENV.fetch("DATABASE_URL"))
adapter = ActiveJob::Base.queue_adapter
ActiveJobPeer.serve { |k| adapter.enqueue_all(Array.new(k) { BenchNoopJob.new }) }
