# frozen_string_literal: true

module TaskerCore
  # ActiveJob on tasker_core (the queue adapter :tasker_core,
  # ActiveJob::QueueAdapters::TaskerCoreAdapter): each job is a task of the
  # built-in one-step template active_job/perform, whose context is the
  # job's serialized data (job.serialize) and whose step runs
  # ActiveJob::Base.execute on a worker, inside the app's reloader and
  # executor like any handler.
  #
  # - queue: the job's queue_name (a worker must serve it: `--queues`);
  # - priority: ActiveJob's lower-runs-first priority, negated into ours
  #   (higher runs first) and clamped to -100..100;
  # - wait / wait_until: the task's run_at;
  # - retries: ActiveJob's. retry_on re-enqueues a new job (a new task) and
  #   discard_on drops it; either way the step that ran it completes. An
  #   exception no rescue handler takes fails the step for good (the template
  #   does not retry, as GoodJob and Solid Queue do not): it stays in error,
  #   visible in `tasker status` and the dashboard, and `tasker step retry`
  #   runs it again.
  #
  # The step times out after active_job.timeout_ms (an hour by default).
  #
  # Tasks carry the identity_key "active_job/<job class>/<job_id>/<executions>":
  # enqueueing the same execution of a job twice makes one task, and status
  # counts jobs by class from it without decoding contexts.
  module JobAdapter
    NAMESPACE = "active_job"
    NAME = "perform"
    VERSION = "1"
    HANDLER = "TaskerCore::JobAdapter::Perform"

    # Jobs by class and task state (counts).
    COUNTS_SQL = <<~SQL
      SELECT split_part(identity_key, '/', 2) AS job_class, state, count(*)::bigint AS count
        FROM tasker_tasks WHERE namespace = '#{NAMESPACE}' AND identity_key LIKE 'active_job/%'
       GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2
    SQL

    # The step's handler on the worker.
    class Perform
      def call(task, _sequence, _step)
        job_data = task.context
        ::ActiveJob::Base.execute(job_data)
        { "job_class" => job_data["job_class"], "job_id" => job_data["job_id"], "execution" => job_data["executions"].to_i + 1 }
      end
    end

    class << self
      # The built-in template, in a registry of its own (the app's
      # config/tasks is not involved); its step times out after
      # active_job.timeout_ms (read when the configuration changes).
      def templates
        timeout = TaskerCore.config.dig("active_job", "timeout_ms")
        cached = @templates
        return cached.last if cached && cached.first == timeout

        registry = TaskTemplateRegistry.new
        registry.register(TaskTemplate.new(
                            { "name" => NAME, "namespace" => NAMESPACE, "version" => VERSION,
                              "description" => "An ActiveJob job: one step running ActiveJob::Base.execute on its data",
                              "steps" => [{ "name" => NAME, "handler" => HANDLER, "timeout_ms" => timeout,
                                            "retry" => { "retryable" => false, "max_attempts" => 1 } }] },
                            path: "(tasker_core's ActiveJob template)"
                          ))
        @templates = [timeout, registry]
        registry
      end

      # Creates one task per job in one statement; sets each job's
      # provider_job_id to its task id. run_at: the time of every job (nil =
      # each job's scheduled_at, if any). Returns the task ids.
      def enqueue(jobs, run_at: nil)
        ids = Tasks.create_tasks(jobs.map { |job| entry(job, run_at) }, templates: templates)
        jobs.each_with_index { |job, i| job.provider_job_id = ids[i] }
        ids
      end

      # The create_tasks entry of one job.
      def entry(job, run_at = nil)
        data = job.serialize
        run_at ||= scheduled_at(job)
        { name: NAME, namespace: NAMESPACE, version: VERSION, context: data,
          identity_key: "active_job/#{data['job_class']}/#{data['job_id']}/#{data['executions'].to_i}",
          queue: job.queue_name.to_s, priority: priority(job.priority), run_at: run_at }.compact
      end

      def priority(job_priority) = job_priority.nil? ? nil : (-Integer(job_priority)).clamp(Queues::PRIORITY)

      # Jobs by class and task state, from the identity keys:
      # [{ "job_class", "state", "count" }], most first. Reads the partial
      # index tasker_tasks_active_job (migration 0013: the namespace's tasks
      # only), not the whole table; the namespace is a literal so that the
      # planner matches the index's predicate.
      def counts(conn) = conn.exec(COUNTS_SQL).to_a

      private

      # The job's own time (set(wait:) / set(wait_until:) keep it on the
      # job: a Float of epoch seconds in ActiveJob 7.0, a Time from 7.1);
      # enqueue_at passes it as run_at instead. A past time is now.
      def scheduled_at(job)
        at = job.respond_to?(:scheduled_at) ? job.scheduled_at : nil
        at = Time.at(at) if at.is_a?(Numeric)
        at && at > Time.now ? at : nil
      end
    end
  end
end
