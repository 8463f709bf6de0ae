# frozen_string_literal: true

require "active_job"
require "tasker_core"

module ActiveJob
  module QueueAdapters
    # config.active_job.queue_adapter = :tasker_core
    #
    # Each job becomes a one-step task on its queue (TaskerCore::JobAdapter):
    # run by `tasker worker` processes serving that queue, dispatched by the
    # orchestrator, stored in PostgreSQL like every task. Under Rails the
    # Railtie loads this file; elsewhere, require it before setting the
    # adapter.
    #
    # A job that cannot be written (a queue name tasker_core refuses, the
    # database down or refusing the statement) raises ActiveJob::EnqueueError
    # whose cause is the TaskerCore or PG error, as ActiveJob asks of
    # adapters: perform_later then returns false and sets job.enqueue_error.
    #
    # On ActiveJob versions with ActiveJob::QueueAdapters::AbstractAdapter
    # (Rails 7.2+) it is the superclass, so hooks ActiveJob adds there
    # (stopping?) exist here too.
    class TaskerCoreAdapter < (QueueAdapters.const_defined?(:AbstractAdapter, false) ? QueueAdapters::AbstractAdapter : Object)
      def enqueue(job)
        enqueuing { TaskerCore::JobAdapter.enqueue([job]) }
        job
      end

      # wait: / wait_until: the task's steps become ready at timestamp (seconds since the epoch).
      def enqueue_at(job, timestamp)
        enqueuing { TaskerCore::JobAdapter.enqueue([job], run_at: Time.at(timestamp)) }
        job
      end

      # ActiveJob.perform_all_later (Rails 7.1+): every job in one statement,
      # one commit, so all of them are enqueued or none: each job's
      # successfully_enqueued says which, and on failure each job's
      # enqueue_error is the ActiveJob::EnqueueError (perform_all_later does
      # not rescue). Returns how many were enqueued.
      def enqueue_all(jobs)
        enqueuing { TaskerCore::JobAdapter.enqueue(jobs) }
        jobs.each { |job| job.successfully_enqueued = true if job.respond_to?(:successfully_enqueued=) }
        jobs.size
      rescue EnqueueError => e
        jobs.each do |job|
          job.successfully_enqueued = false if job.respond_to?(:successfully_enqueued=)
          job.enqueue_error = e if job.respond_to?(:enqueue_error=)
        end
        0
      end

      # Rails 7.2+: enqueue at once. Inside an ActiveRecord transaction the
      # task is written on its connection and commits or rolls back with it
      # (docs/rails.md), so there is nothing to defer.
      def enqueue_after_transaction_commit? = false

      private

      # Errors of writing the task, raised as ActiveJob::EnqueueError (the
      # original as its cause). Others (a job whose arguments do not
      # serialize, say) pass through as ActiveJob raises them for any adapter.
      def enqueuing
        yield
      rescue TaskerCore::Error, *(defined?(::PG::Error) ? [::PG::Error] : []) => e
        raise EnqueueError, "tasker_core could not enqueue the job: #{e.class}: #{e.message}"
      end
    end
  end
end
