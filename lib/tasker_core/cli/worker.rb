# frozen_string_literal: true

module TaskerCore
  class CLI
    # tasker worker --handlers PATH: TaskerCore::WorkerProcess, as exe/tasker-worker, plus --app
    class Worker < Command
      include RailsApp

      DESCRIPTION = <<~TEXT.chomp
        Runs a worker in the foreground: it connects to the orchestrator's endpoints
        (zeromq.batch_endpoint / zeromq.result_endpoint) and runs the steps it is sent.
        In a Rails app (config/environment.rb here, or --app DIR) it boots the app first:
        handlers autoload from app/handlers, no --handlers needed.
        Signals: TERM/INT drain (steps not started go back to the orchestrator, running ones finish) and exit 0;
        TSTP stops taking work; CONT resumes.
      TEXT

      private

      def define_options(o)
        WorkerProcess.define_options(o, @options)
        define_app_option(o)
      end

      def call(_args)
        begin
          WorkerProcess.validate!(@options, rails_app: rails_app?)
        rescue ArgumentError => e
          raise UsageError, e.message
        end
        WorkerProcess.new(**@options.slice(*WorkerProcess::OPTIONS)).run
      end
    end
  end
end
