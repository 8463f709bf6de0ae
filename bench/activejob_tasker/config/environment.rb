# frozen_string_literal: true

# The smallest Rails application for ActiveJob on tasker_core: ActiveJob
# only (tasker_core reaches PostgreSQL through DATABASE_URL itself), logging
# at warn, the queue adapter :tasker_core, one no-op job. Booted by
# `tasker worker` / `tasker orchestrator` (worker.rb, run with this folder
# as the working directory) and by enqueuer.rb; the settings are
# config/tasker-config.yml.
require "rails"
require "active_job/railtie"
require "tasker_core"

module TaskerJobBench
  class Application < Rails::Application
    config.root = File.expand_path("..", __dir__)
    config.load_defaults 7.0
    config.eager_load = false
    config.cache_classes = true # no reloader, no file watching around each job (production), as bench/goodjob
    config.logger = ActiveSupport::Logger.new($stdout)
    config.log_level = :warn
    config.active_job.queue_adapter = :tasker_core
    config.secret_key_base = "bench"
  end
end

Rails.application.initialize!
require_relative "../../lib/activejob_peer"
