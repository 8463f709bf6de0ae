# frozen_string_literal: true

module TaskerCore
  module Worker
    # Runs steps: max_workers pool threads take Jobs, run each handler inside
    # TaskerCore.handler_wrapper (the Rails executor and reloader under
    # Rails), encode its partial (Partials) and hand it back through a queue
    # plus a wake-up of the I/O thread. They never touch a socket.
    #
    # Hand-off: a batch's jobs are queued at once and wake one idle thread;
    # a thread that takes a job while others wait queued wakes one more
    # (never more than one wake-up outstanding). A thread that finishes a
    # step takes the next queued job itself. So a burst of quick steps runs
    # on the threads already awake instead of waking every idle thread,
    # while a handler that blocks (I/O, sleep) still lets the next job start
    # on another thread at once: whenever jobs are queued and a thread is
    # idle, one is being woken.
    #
    # Deadlines: the I/O thread calls #expire as the watchdog; a step past
    # its deadline is interrupted (TimeoutInterrupt) and reported by the
    # caller at once; a thread that ignores the interrupt past
    # timeout_grace_s is abandoned and replaced.
    class Executor
      # Raised into a handler's thread when its step times out. Not a
      # StandardError, so a handler's `rescue => e` cannot swallow it.
      class TimeoutInterrupt < Exception; end # rubocop:disable Lint/InheritException

      # Thread.handle_interrupt masks, made once.
      DEFER_TIMEOUT = { TimeoutInterrupt => :never }.freeze
      ALLOW_TIMEOUT = { TimeoutInterrupt => :immediate }.freeze

      # wake: called (from a pool thread) when a result is ready or a new
      # deadline is earlier than the I/O thread's next wake-up.
      def initialize(settings:, registry:, partials:, stats:, logger:, wake:)
        @settings = settings
        @worker_id = settings.worker_id
        @registry = registry
        @partials = partials
        @stats = stats
        @logger = logger
        @wake = wake
        @mutex = Mutex.new # guards job states, @running, @pool, @next_wake_at, @stopping and the job queue
        @jobs_ready = ConditionVariable.new
        @jobs = [] # queued Jobs, oldest first
        @idle = 0 # pool threads waiting for a job
        @waking = 0 # of those, woken (signalled) and not yet running
        @closed = false # no more jobs: threads leave once the queue is empty
        @results = Thread::Queue.new
        @running = Set.new.compare_by_identity # Jobs are mutable Structs: hash by identity
        @pool = []
        @next_wake_at = nil
        @stopping = false
      end

      def start
        @mutex.synchronize { @settings.max_workers.times { @pool << spawn_pool_thread } }
        self
      end

      # Queues jobs (a batch's, in order) for the pool.
      def submit(jobs)
        @mutex.synchronize do
          @jobs.concat(jobs)
          wake_idle_thread
        end
      end

      def results_ready? = !@results.empty?

      # The Outgoing partials finished since the last call, in order.
      def finished
        out = []
        out << @results.pop until @results.empty?
        out
      end

      # No more replacement threads: the worker is stopping.
      def stopping!
        @mutex.synchronize { @stopping = true }
      end

      # Closes the queue and waits up to timeout_grace_s for each thread.
      def join
        @mutex.synchronize do
          @closed = true
          @jobs_ready.broadcast
        end
        pool = @mutex.synchronize { @pool.dup }
        pool.each { |t| t.join(@settings.timeout_grace_s) }
      end

      # The earliest of wake_at and every running step's deadline; kept so a
      # pool thread can tell whether its new deadline needs a wake-up.
      def next_wake_at(wake_at)
        @mutex.synchronize do
          @running.each do |job|
            wake_at = job.deadline if job.state == :running && job.deadline < wake_at
            wake_at = job.grace_deadline if job.state == :timed_out && job.grace_deadline && job.grace_deadline < wake_at
          end
          @next_wake_at = wake_at
        end
      end

      # The watchdog: marks the steps that ran past their deadline as timed
      # out and interrupts their threads; abandons a thread that ignores the
      # interrupt. Returns [[job, message], ...] for the caller to report.
      def expire(now)
        expired = []
        @mutex.synchronize do
          @running.each do |job|
            if job.state == :running && now >= job.deadline
              job.state = :timed_out
              job.grace_deadline = now + @settings.timeout_grace_s
              job.thread.raise(TimeoutInterrupt)
              expired << job
            elsif job.state == :timed_out && job.grace_deadline && now >= job.grace_deadline
              abandon(job)
            end
          end
          @running.delete_if { |job| job.thread[:tc_abandoned] }
        end
        expired.map do |job|
          [job, "step #{job.step['step_name']} (#{job.step['handler']}) exceeded its timeout of " \
                "#{(job.timeout_s * 1000).round} ms"]
        end
      end

      # Draining: the jobs still queued, never started, taken out of the
      # queue for the caller to hand back. Returns them in queue order.
      def withdraw_queued
        @mutex.synchronize do
          withdrawn = @jobs.select { |job| job.state == :queued }
          @jobs.clear
          withdrawn.each { |job| job.state = :withdrawn }
        end
      end

      # Shutdown ran out of time: every job of jobs still queued or running
      # is marked timed out (a running one interrupted). Returns
      # [[job, message], ...] for the caller to report.
      def give_up(jobs)
        @mutex.synchronize do
          jobs.filter_map do |job|
            next unless %i[queued running].include?(job.state)

            job.thread&.raise(TimeoutInterrupt) if job.state == :running
            message = job.state == :queued ? "worker shut down before the step started" : "worker shut down while the step ran"
            job.state = :timed_out
            [job, message]
          end
        end
      end

      private

      def spawn_pool_thread
        thread = Thread.new { pool_main }
        thread.name = "tasker-worker-pool"
        thread
      end

      def pool_main
        # Timeout interrupts are only let in while a handler runs; one that
        # arrives between steps must not hit the next step (see run_job).
        Thread.handle_interrupt(DEFER_TIMEOUT) do
          while (job = take_job)
            run_job(job)
            break if Thread.current[:tc_abandoned]
          end
        end
      end

      # The next queued job, marked running on this thread (one that timed
      # out by shutdown while queued is skipped); nil once the queue is
      # closed and empty. Waits while there is none.
      def take_job
        @mutex.synchronize do
          loop do
            while @jobs.empty?
              return nil if @closed

              wait_for_job
            end
            job = @jobs.shift
            # More work queued: a second thread, in case this step blocks.
            wake_idle_thread
            next unless job.state == :queued # timed out by shutdown before it started

            start_job(job)
            return job
          end
        end
      end

      # Called with @mutex held.
      def wait_for_job
        @idle += 1
        @jobs_ready.wait(@mutex)
      ensure
        @idle -= 1
        # A signalled thread is running now; a spurious or broadcast
        # wake-up may have left the signal to another thread: then the
        # next one to run consumes it, and the next submit wakes again.
        @waking -= 1 if @waking.positive?
      end

      # Wakes one idle thread when jobs are queued and no wake-up is on its
      # way already. Called with @mutex held.
      def wake_idle_thread
        return if @jobs.empty? || @waking.positive? || @idle.zero?

        @waking += 1
        @jobs_ready.signal
      end

      # Called with @mutex held.
      def start_job(job)
        job.state = :running
        job.thread = Thread.current
        job.started_at = Process.clock_gettime(Process::CLOCK_REALTIME)
        job.deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + job.timeout_s
        @running << job
        @wake.call if @next_wake_at.nil? || job.deadline < @next_wake_at
      end

      def run_job(job)

        out = nil
        claimed = false
        instrument_step(:step_started, job)
        begin
          Thread.handle_interrupt(ALLOW_TIMEOUT) do
            output, error = execute(job)
            out = @partials.encode(job, output, error)
            # After this, the watchdog no longer interrupts the thread.
            claimed = @mutex.synchronize { job.state == :running && (job.state = :done) }
          end
        rescue TimeoutInterrupt
          claimed = false
        end
        discard_pending_interrupt

        @mutex.synchronize { @running.delete(job) }
        if claimed
          @results << out
          @wake.call
          instrument_step(out.kind == Protocol::STATUS_COMPLETE ? :step_completed : :step_failed, job, out.error || {})
        else
          @stats.bump(:late_results_discarded)
        end
      end

      def execute(job)
        task, sequence, step = StepContext.from_wire(job.step, batch_id: job.batch.id)
        output = TaskerCore.wrap_handler { @registry.handler_for(job.step["handler"]).call(task, sequence, step) }
        return [output, nil] if output.is_a?(Hash)

        # A deterministic bug in the handler: retrying gives the same answer.
        [nil, Protocol.error_object(klass: "TypeError", retryable: false,
                                    message: "handler #{job.step['handler']} returned #{output.class}, " \
                                             "a step's output must be a Hash")]
      rescue TimeoutInterrupt
        raise
      rescue Exception => e # rubocop:disable Lint/RescueException
        # Anything a handler raises (NotImplementedError and SystemStackError
        # are not StandardErrors) fails its step, never the worker.
        [nil, Protocol.error_from_exception(e)]
      end

      # Events for TaskerCore.subscribe / ActiveSupport::Notifications (a
      # timed-out step is reported by the watchdog, not here).
      # error: the failed step's error object ({} when it completed).
      def instrument_step(event, job, error = nil)
        return unless Instrumentation.listening?(event)

        step = job.step
        payload = { step_id: step["step_id"], task_id: step["task_id"], step_name: step["step_name"],
                    handler: step["handler"], attempt: step["attempt"], worker_id: @worker_id, batch_id: job.batch.id }
        if error
          payload[:duration_ms] = ((Process.clock_gettime(Process::CLOCK_REALTIME) - job.started_at) * 1000).round(3)
          if event == :step_failed
            payload.merge!(error_class: error["class"], error_message: error["message"], retryable: error["retryable"])
          end
        end
        Instrumentation.instrument(event, payload)
      rescue StandardError => e
        @logger.warn("tasker worker #{@worker_id}: instrumenting #{event}: #{e.message}")
      end

      def discard_pending_interrupt
        return unless Thread.pending_interrupt?(TimeoutInterrupt)

        Thread.handle_interrupt(ALLOW_TIMEOUT) { nil }
      rescue TimeoutInterrupt
        nil
      end

      # Called with @mutex held.
      def abandon(job)
        thread = job.thread
        thread[:tc_abandoned] = true
        @pool.delete(thread)
        @pool << spawn_pool_thread unless @stopping
        @stats.bump(:threads_abandoned)
        @logger.warn("tasker worker #{@worker_id}: handler #{job.step['handler']} ignored its timeout; " \
                     "its thread is abandoned and replaced")
      end
    end
  end
end
