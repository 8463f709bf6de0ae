# frozen_string_literal: true

require "tasker_core"

module ActiveJob
  module QueueAdapters
    # config.active_job.queue_adapter = :tasker_core
    #
    # Each job becomes a one-step task on its queue (TaskerCore::JobAdapter):
    # run by `tasker worker` processes serving that queue, dispatched by the
    # orchestrator, stored in PostgreSQL like every task. Under Rails the
    # Railtie loads this file; elsewhere, require it before setting the adapter.
    class TaskerCoreAdapter
      def enqueue(job)
        TaskerCore::JobAdapter.enqueue([job])
        job
      end

      # wait: / wait_until: the task's steps become ready at timestamp (seconds since the epoch).
      def enqueue_at(job, timestamp)
        TaskerCore::JobAdapter.enqueue([job], run_at: Time.at(timestamp))
        job
      end

      # ActiveJob.perform_all_later (Rails 7.1+): every job in one statement,
      # one commit. Returns how many were enqueued (all of them, or an error).
      def enqueue_all(jobs)
        TaskerCore::JobAdapter.enqueue(jobs)
        jobs.each { |job| job.successfully_enqueued = true if job.respond_to?(:successfully_enqueued=) }
        jobs.size
      end

      # Rails 7.2+: enqueue at once. Inside an ActiveRecord transaction the
      # task is written on its connection and commits or rolls back with it
      # (docs/rails.md), so there is nothing to defer.
      def enqueue_after_transaction_commit? = false
    end
  end
end
