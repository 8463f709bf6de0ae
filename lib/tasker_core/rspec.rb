# frozen_string_literal: true

require "tasker_core"
require_relative "rspec/inline"
require_relative "rspec/stack"
require_relative "rspec/matchers"

module TaskerCore
  # Testing workflows with RSpec (docs/rspec.md):
  #
  #   require "tasker_core/rspec"
  #   RSpec.configure { |c| c.include TaskerCore::RSpec::Helpers }
  #
  # - tasker_inline.run(...) runs one task's DAG in the spec's process, with
  #   the store's own state machine and retry rules (needs a database, no
  #   sockets); metadata :tasker_inline gives a migrated, truncated one.
  # - the kit empties only a test database (name ending in _test) or one it
  #   started itself; see Stack.check_database!.
  # - metadata :tasker_stack starts, once per suite, an orchestrator (the
  #   native loop) and a worker subprocess, and empties the tables before
  #   each example.
  # - matchers: complete_within(seconds), have_step(name).in_state(:complete)
  #   .with_output(...), fail_step(name).with_error(ErrorClass).
  module RSpec
    module Helpers
      include Matchers

      def tasker_inline(**options) = Inline.new(**options)
      def tasker_stack = Stack.current
    end

    def self.install(config)
      config.include Helpers
      config.before(:each, :tasker_stack) { Stack.start!.reset! }
      config.before(:each, :tasker_inline) { Stack.database!.pause_orchestration.reset! }
      # Tasks are created on the kit's own connections, committed at once,
      # even inside a transactional fixture: the orchestrator, the worker and
      # the inline runner read them from other connections.
      %i[tasker_stack tasker_inline].each do |tag|
        config.around(:each, tag) { |example| ActiveRecordDatabase.with_connection_mode(:never) { example.run } }
      end
      config.after(:suite) { Stack.shutdown! }
    end
  end
end

TaskerCore::RSpec.install(RSpec.configuration) if defined?(RSpec) && RSpec.respond_to?(:configuration)
