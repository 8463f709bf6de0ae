# frozen_string_literal: true

module TaskerCore
  class Web
    module Metrics
      # The step counters of /metrics, counted from the step transitions log
      # (an append-only table with a bigserial id): each scrape reads only
      # the transitions after the last id it has read and adds them to
      # totals kept in this process. The totals start at 0 with the process
      # (from the log's tail at the first scrape) and only go up: a retried
      # step or a deleted task takes nothing away.
      #
      # What is counted, by namespace, template and step name:
      # - completed: transitions to complete;
      # - failed: transitions to error (an attempt that failed for good;
      #   a step retried by hand that fails again counts again);
      # - retried: claims of a step beyond its first attempt (attempt > 1:
      #   retries after a failure, after retry_step, re-dispatches);
      # - the claim -> complete latency of each transition to complete (its
      #   time less the step's last claim).
      #
      # Ids are drawn when a row is inserted but become visible when its
      # transaction commits, not in id order: an id not seen below the
      # highest one read is remembered as a hole and looked up again at the
      # next scrapes, until it appears (and is counted then) or HOLE_TTL_S
      # has passed (a rolled-back insert leaves a hole for good).
      #
      # Work per scrape is bounded: one statement reads at most max_ids
      # transition ids (MAX_IDS, about 100 ms on a shared 2-core machine,
      # bench/results/web.json); a scrape after a long pause catches up over
      # the next ones (tasker_step_transitions_behind says how far behind the
      # counters are). One statement rather than several smaller ones: the
      # BRIN index always matches its block ranges not summarized yet (the
      # newest, until autovacuum summarizes them), and each statement would
      # read those again. Thread-safe: one scrape reads at a time, the others
      # wait for it and then read what is left.
      class StepCounters
        MAX_IDS = 30_000
        HOLE_TTL_S = 600
        MAX_HOLES = 10_000

        # completed, failed, retried, latency sum, then the count at or below each bucket bound
        Totals = Struct.new(:completed, :failed, :retried, :latency_sum, :buckets)

        TAIL_SQL = <<~SQL
          SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END AS tail
            FROM tasker_workflow_step_transitions_id_seq
        SQL

        # from_id: count the transitions after this id instead of from the
        # log's tail at the first scrape (bench/web_bench.rb's long pause).
        def initialize(buckets:, max_ids: MAX_IDS, from_id: nil)
          @buckets = buckets
          @max_ids = max_ids
          @lock = Mutex.new
          @cursor = from_id # the highest transition id read
          @holes = {} # id -> monotonic time it was first missed
          @totals = {} # [namespace, template, step] -> Totals
          @read_sql = read_sql
        end

        # Reads what the log holds since the last call (within the bounds)
        # and returns [a copy of the totals, transition ids not yet read].
        def scrape(conn)
          @lock.synchronize do
            behind = advance(conn)
            [@totals.transform_values { |t| Totals.new(t.completed, t.failed, t.retried, t.latency_sum, t.buckets.dup) },
             behind]
          end
        end

        private

        def advance(conn)
          tail = conn.exec(TAIL_SQL).first["tail"]
          if @cursor.nil? || tail < @cursor # first scrape, or the sequence was restarted
            @cursor = tail
            @holes.clear
            return 0
          end
          expire_holes
          hi = [@cursor + @max_ids, tail].min
          read_range(conn, @cursor, hi, @holes.keys) if hi > @cursor || !@holes.empty?
          @cursor = hi
          tail - @cursor
        end

        # Transitions with lo < id <= hi, and the holes below lo.
        def read_range(conn, lo, hi, holes)
          rows = conn.transaction do
            conn.exec("SET LOCAL jit = off") # compiling would cost more than the statement
            conn.exec(@read_sql, [lo, hi, holes, holes.min || lo + 1])
          end
          meta = rows.first
          split_ids(meta["found"]).each { |id| @holes.delete(id) }
          now = clock
          split_ids(meta["missing"]).each { |id| @holes[id] = now }
          rows.each { |r| add(r) if r["namespace"] }
          trim_holes
        end

        def add(row)
          t = (@totals[[row["namespace"], row["template"], row["step"]]] ||=
                 Totals.new(0, 0, 0, 0.0, Array.new(@buckets.size, 0)))
          n = row["n"]
          case row["kind"]
          when "error" then t.failed += n
          when "claimed" then t.retried += n
          when "complete"
            t.completed += n
            t.latency_sum += row["latency_sum"] || 0.0
            # the first bucket holding these: the smallest bound >= their latency
            first = row["bounds_above"] && @buckets.size - row["bounds_above"]
            (first...@buckets.size).each { |i| t.buckets[i] += n } if first
          end
        end

        def split_ids(text) = text.nil? || text.empty? ? [] : text.split(",").map { |s| Integer(s, 10) }

        def expire_holes
          cutoff = clock - HOLE_TTL_S
          @holes.delete_if { |_, at| at < cutoff }
        end

        def trim_holes
          return if @holes.size <= MAX_HOLES

          @holes.keys.sort.first(@holes.size - MAX_HOLES).each { |id| @holes.delete(id) }
        end

        def clock = Process.clock_gettime(Process::CLOCK_MONOTONIC)

        # One statement, so one snapshot: the ids found, the ids missing and
        # the counts agree. The log is read by id range through the BRIN
        # index on id (migration 0007); steps and tasks by primary key, only
        # for the transitions counted (LIMIT 1 keeps those lookups per row,
        # never a hash of a whole table). A completed step's latency comes
        # back as its bucket: width_bucket of the negated latency over the
        # negated bounds counts the bounds >= the latency, so le semantics
        # hold at a bound exactly.
        def read_sql
          bounds = "'{#{@buckets.reverse.map { |b| -Float(b) }.join(',')}}'::float8[]"
          <<~SQL
            WITH r AS MATERIALIZED (
              SELECT tr.id, tr.step_id, tr.task_id, tr.to_state, tr.reason, tr.attempt, tr.created_at
                FROM tasker_workflow_step_transitions tr WHERE tr.id > $1 AND tr.id <= $2
              UNION ALL
              SELECT tr.id, tr.step_id, tr.task_id, tr.to_state, tr.reason, tr.attempt, tr.created_at
                FROM tasker_workflow_step_transitions tr
               WHERE tr.id = ANY ($3::bigint[]) AND tr.id >= $4 AND tr.id <= $1
            ), seen AS (
              SELECT (SELECT string_agg(id::text, ',') FROM r WHERE id <= $1) AS found,
                     CASE WHEN (SELECT count(*) FROM r WHERE id > $1) < $2 - $1 THEN
                       (SELECT string_agg(g::text, ',') FROM generate_series($1 + 1, $2) g
                         WHERE NOT EXISTS (SELECT 1 FROM r WHERE r.id = g))
                     END AS missing
            ), counted AS (
              SELECT t.namespace, t.template, s.step,
                     CASE WHEN r.reason = 'claimed' THEN 'claimed' ELSE r.to_state END AS kind,
                     width_bucket(-l.s, #{bounds}) AS bounds_above, count(*) AS n, sum(l.s) AS latency_sum
                FROM r
                CROSS JOIN LATERAL (SELECT name AS step, last_attempt_at FROM tasker_workflow_steps
                                     WHERE id = r.step_id LIMIT 1) s
                CROSS JOIN LATERAL (SELECT namespace, name AS template FROM tasker_tasks WHERE id = r.task_id LIMIT 1) t
                CROSS JOIN LATERAL (SELECT CASE WHEN r.to_state = 'complete' THEN
                                             extract(epoch FROM r.created_at - s.last_attempt_at)::float8 END) l(s)
               WHERE r.to_state IN ('complete', 'error') OR (r.reason = 'claimed' AND r.attempt > 1)
               GROUP BY 1, 2, 3, 4, 5
            )
            SELECT seen.found, seen.missing, counted.* FROM seen LEFT JOIN counted ON true
          SQL
        end
      end
    end
  end
end
