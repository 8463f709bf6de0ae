# frozen_string_literal: true

# The smallest Rails application Solid Queue runs in: ActiveRecord and
# ActiveJob only, the database from DATABASE_URL (no database.yml; Solid
# Queue's tables in the same database, as `connects_to` is not set), logging
# at warn, one no-op job. Loaded by bin/jobs (run with bench/solidqueue as
# the working directory, BUNDLE_GEMFILE=bench/solidqueue/Gemfile) and by
# bench/solidqueue/enqueuer.rb.
require "rails"
require "active_record/railtie"
require "active_job/railtie"
require "solid_queue"

module SolidQueueBench
  class Application < Rails::Application
    config.root = File.expand_path("..", __dir__)
    config.load_defaults 7.1
    config.eager_load = false
    config.cache_classes = true
    config.logger = ActiveSupport::Logger.new($stdout)
    config.log_level = :warn
    config.active_job.queue_adapter = :solid_queue
    config.solid_queue.logger = config.logger
    config.solid_queue.preserve_finished_jobs = true # finished_at is how the benchmark counts the jobs
    config.secret_key_base = "bench"
  end
end

Rails.application.initialize!
require_relative "../../lib/activejob_peer"
