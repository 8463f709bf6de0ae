# frozen_string_literal: true

# The smallest Rails application GoodJob runs in: ActiveRecord and ActiveJob
# only, the database from DATABASE_URL (no database.yml), logging at warn,
# one no-op job. Loaded by `good_job start` (run with bench/goodjob as the
# working directory, BUNDLE_GEMFILE=bench/goodjob/Gemfile) and by
# bench/goodjob/enqueuer.rb.
require "rails"
require "active_record/railtie"
require "active_job/railtie"
require "good_job"

module GoodJobBench
  class Application < Rails::Application
    config.root = File.expand_path("..", __dir__)
    config.load_defaults 7.0
    config.eager_load = false
    config.cache_classes = true # no reloader, no file watching around each job (production)
    config.logger = ActiveSupport::Logger.new($stdout)
    config.log_level = :warn
    config.active_job.queue_adapter = :good_job
    config.good_job.execution_mode = :external
    config.good_job.preserve_job_records = true # finished_at is how the benchmark counts and times the jobs
    config.good_job.enable_cron = false
    config.secret_key_base = "bench"
  end
end

Rails.application.initialize!
require_relative "../../lib/activejob_peer"
