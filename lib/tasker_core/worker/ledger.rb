# frozen_string_literal: true

require "set"

module TaskerCore
  module Worker
    # What this worker owes the orchestrator: every accepted step until its
    # partial is sent, every refused step until its refusal is sent, and each
    # batch until its completion is queued. The counts a heartbeat carries
    # (in_flight, in_flight_steps) are read from here, never kept beside it.
    #
    # Changed by the I/O thread only; #in_flight is also read by #stats.
    class Ledger
      # A batch's status for a step handed back unstarted (#withdraw).
      WITHDRAWN = :withdrawn
      # The latest batch's id and the orchestrator's limits for results
      # (every message on the result channel must fit them).
      attr_reader :last_batch_id, :result_limits

      def initialize(settings)
        @worker_id = settings.worker_id
        @own_result_limits = settings.own_result_limits
        # token (a Job, or a refused step's [step_id, attempt] until its
        # refusal is sent) => [step_id, attempt]
        @unreported = {}.compare_by_identity
        # Jobs whose partial is not queued yet.
        @open_jobs = Set.new.compare_by_identity
        new_orchestrator
      end

      # A new orchestrator took over: it sent none of the batches seen so far.
      def new_orchestrator
        @last_batch_id = nil
        @result_limits = @own_result_limits
      end

      # A batch arrived (or its id could be read): its limits apply from now.
      def batch_seen(batch_id, limits = nil)
        @last_batch_id = batch_id if batch_id
        @result_limits = @own_result_limits.merge(limits) if limits
        @result_limits
      end

      def in_flight = @unreported.size

      # [[step_id, attempt], ...]: the heartbeat's in_flight_steps.
      def in_flight_steps = @unreported.values

      # A step accepted to run.
      def open(job)
        @unreported[job] = [job.step["step_id"], job.step["attempt"]]
        @open_jobs << job
      end

      # Refused steps ({step_id:, attempt:}) count as in flight until their
      # refusal is sent, so no heartbeat reports them as unknown to this
      # worker before the orchestrator has the refusal. Returns their tokens.
      def hold_refused(entries)
        entries.map do |e|
          token = [e[:step_id], e[:attempt]]
          @unreported[token] = token
          token
        end
      end

      # Jobs with no partial queued yet, for a shutdown that ran out of time.
      def open_jobs = @open_jobs.to_a

      # The messages to queue for a step's partial: none when the step was
      # already reported (a timed-out step), else the partial and, once
      # every step of its batch has one, the batch's completion behind it.
      def report(out)
        job = out.job
        return [] unless @open_jobs.delete?(job)

        batch = job.batch
        batch.statuses[job.index] = out.kind
        batch.reported += 1
        batch.reported == batch.steps.size ? [out, completion(batch)] : [out]
      end

      # Jobs handed back unstarted by a draining worker: owed no partial now
      # (their refusal holds them, #hold_refused). Returns the completions
      # of the batches that have nothing left to report.
      def withdraw(jobs)
        jobs.filter_map do |job|
          next unless @open_jobs.delete?(job)

          @unreported.delete(job)
          batch = job.batch
          batch.statuses[job.index] = WITHDRAWN
          batch.reported += 1
          completion(batch) if batch.reported == batch.steps.size
        end
      end

      # The completion of a batch with every step reported (or none to run),
      # listing the steps that ran.
      def completion(batch)
        steps = batch.steps.each_with_index.filter_map do |s, i|
          next if batch.statuses[i] == WITHDRAWN

          { step_id: s["step_id"], attempt: s["attempt"], status: batch.statuses[i] }
        end
        msg = Protocol.batch_completion(batch_id: batch.id, worker_id: @worker_id, steps: steps)
        Outgoing.new(frames: Protocol.encode(msg), kind: :completion)
      end

      # A message left the result socket.
      def sent(out)
        case out.kind
        when :completion then nil
        when :refusal then out.refused.each { |token| @unreported.delete(token) }
        else @unreported.delete(out.job)
        end
      end
    end
  end
end
