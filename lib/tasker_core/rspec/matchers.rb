# frozen_string_literal: true

module TaskerCore
  module RSpec
    # Matchers on a task id (Integer), a TaskerCore.task Hash or an Inline::Result.
    module Matchers
      module TaskLookup
        private

        def task_hash(actual)
          case actual
          when Integer then TaskerCore.task(actual) || raise(Error, "no task #{actual}")
          when Hash then actual[:steps] ? TaskerCore.task(actual[:id]) : actual
          else actual.respond_to?(:task_id) ? TaskerCore.task(actual.task_id) : raise(ArgumentError, "expected a task id, got #{actual.inspect}")
          end
        end

        def step_of(task, name) = task[:steps].find { |s| s[:name] == name.to_s }

        def describe_steps(task)
          task[:steps].map { |s| "#{s[:name]}=#{s[:state]}#{s[:error] ? " (#{s[:error]['class']}: #{s[:error]['message']})" : ''}" }.join(", ")
        end
      end

      # expect(task_id).to complete_within(10): waits (polling) for the
      # task to finish and expects it complete.
      class CompleteWithin
        include TaskLookup

        def initialize(seconds) = @seconds = seconds

        def matches?(actual)
          id = actual.is_a?(Integer) ? actual : task_hash(actual)[:id]
          Stack.running&.serve_pending_queues
          @task = TaskerCore.wait_for(id, timeout: @seconds)
          @task[:status] == "complete"
        rescue WaitTimeoutError => e
          @timeout = e
          @task = TaskerCore.task(id)
          false
        end

        def failure_message
          if @timeout
            "expected task #{@task[:id]} to complete within #{@seconds}s, it is still #{@task[:status]}: #{describe_steps(@task)}"
          else
            "expected task #{@task[:id]} to complete, it finished #{@task[:status]}: #{describe_steps(@task)}"
          end
        end

        def description = "complete within #{@seconds}s"
      end

      # expect(task).to have_step("charge").in_state(:complete).with_output("id" => 1)
      class HaveStep
        include TaskLookup

        def initialize(name)
          @name = name.to_s
          @state = nil
          @output = :any
        end

        def in_state(state)
          @state = state.to_s
          self
        end

        def with_output(expected)
          @output = expected
          self
        end

        def matches?(actual)
          @task = task_hash(actual)
          @step = step_of(@task, @name)
          return false unless @step
          return false if @state && @step[:state] != @state

          @output == :any || values_match?(@output, @step[:output])
        end

        def failure_message
          return "expected task #{@task[:id]} to have a step #{@name}; it has #{@task[:steps].map { |s| s[:name] }.join(', ')}" unless @step

          "expected step #{@name}#{@state ? " in state #{@state}" : ''}#{@output == :any ? '' : " with output #{@output.inspect}"}, " \
            "got #{@step[:state]} with output #{@step[:output].inspect}#{@step[:error] ? " and error #{@step[:error].inspect}" : ''}"
        end

        def failure_message_when_negated = "expected no step #{@name} matching, got #{@step.inspect}"

        def description = "have step #{@name}"

        private

        # Outputs come back with string keys; accept symbol keys and RSpec matchers.
        def values_match?(expected, actual)
          expected = stringify(expected)
          return expected.matches?(actual) if expected.respond_to?(:matches?)

          ::RSpec::Support::FuzzyMatcher.values_match?(expected, actual)
        end

        def stringify(v)
          case v
          when Hash then v.to_h { |k, x| [k.is_a?(Symbol) ? k.to_s : k, stringify(x)] }
          when Array then v.map { |x| stringify(x) }
          else v
          end
        end
      end

      # expect(task).to fail_step("charge").with_error(PaymentDeclined)
      # (the step is in state error, or failed at least once and was retried).
      class FailStep
        include TaskLookup

        def initialize(name)
          @name = name.to_s
          @error = nil
          @message = nil
        end

        def with_error(klass, message = nil)
          @error = klass.is_a?(Class) ? klass.name : klass.to_s
          @message = message
          self
        end

        def matches?(actual)
          @task = task_hash(actual)
          @step = step_of(@task, @name)
          return false unless @step && @step[:error]
          return false unless @step[:state] == "error" || @step[:failures].to_i.positive?
          return false if @error && @step[:error]["class"] != @error

          @message.nil? || (@message.is_a?(Regexp) ? @message.match?(@step[:error]["message"]) : @step[:error]["message"] == @message)
        end

        def failure_message
          return "expected task #{@task[:id]} to have a step #{@name}" unless @step

          "expected step #{@name} to fail#{@error ? " with #{@error}" : ''}#{@message ? " (#{@message.inspect})" : ''}, " \
            "got #{@step[:state]} with error #{@step[:error].inspect}"
        end

        def failure_message_when_negated = "expected step #{@name} not to fail#{@error ? " with #{@error}" : ''}, got #{@step[:error].inspect}"

        def description = "fail step #{@name}"
      end

      def complete_within(seconds) = CompleteWithin.new(seconds)
      def have_step(name) = HaveStep.new(name) # rubocop:disable Naming/PredicateName
      def fail_step(name) = FailStep.new(name)
    end
  end
end
