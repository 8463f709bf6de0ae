# frozen_string_literal: true

require_relative "tasker_core/version"
require_relative "tasker_core/errors"
require_relative "tasker_core/logging"
require_relative "tasker_core/config"

begin
  require "tasker_core/tasker_core_ext"
rescue LoadError => e
  raise LoadError, "tasker_core's C extension could not be loaded (#{e.message}). " \
                   "From a checkout, build it with `bin/setup` (or `bundle exec rake compile`); " \
                   "as a gem, reinstall it with libzmq, msgpack-c and libpq development files present " \
                   "(Debian/Ubuntu: libzmq3-dev, libmsgpack-c-dev or libmsgpack-dev, libpq-dev; Homebrew: zeromq msgpack libpq)."
end

require_relative "tasker_core/curve"
require_relative "tasker_core/payload"
require_relative "tasker_core/bind_policy"
require_relative "tasker_core/protocol"
require_relative "tasker_core/step_context"
require_relative "tasker_core/step_handler"
require_relative "tasker_core/handler_registry"
require_relative "tasker_core/handler_wrapper"
require_relative "tasker_core/orchestration/batch_step_execution_orchestrator"
require_relative "tasker_core/worker_process"
require_relative "tasker_core/store"
require_relative "tasker_core/active_record_database"
require_relative "tasker_core/embedded_postgres"
require_relative "tasker_core/tasks"
require_relative "tasker_core/job_adapter"
require_relative "tasker_core/retention"
require_relative "tasker_core/internal/orchestration_manager"
require_relative "tasker_core/orchestrator"
require_relative "tasker_core/orchestration_loop"
require_relative "tasker_core/instrumentation"
require_relative "tasker_core/discovery"
require_relative "tasker_core/railtie" if defined?(Rails::Railtie)

# tasker_core: durable DAG workflows in PostgreSQL, dispatched to Ruby
# workers in batches over ZeroMQ.
module TaskerCore
end
