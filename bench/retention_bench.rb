# frozen_string_literal: true

# Retention under load: does deleting old finished tasks slow down the work
# that is running? Store-level, like bench/store_bench.rb (whose harness it
# uses): the SQL functions the orchestration loop calls, from Ruby
# connections, no messaging.
#
#   1. seed:     RETENTION_FINISHED_STEPS steps (tasks of 10 independent steps)
#                created and run to completion through tasker_claim_steps /
#                tasker_mark_dispatched / tasker_apply_results, then aged 30
#                days by SQL (finished_at), then VACUUM ANALYZE.
#   2. baseline: RETENTION_NEW_STEPS new steps created by one connection and
#                drained by another (store_bench's "concurrent" mode); no cleanup.
#   3. cleanup:  the same while a third connection runs
#                TaskerCore::Retention (older_than 7 days, batches of
#                RETENTION_BATCH tasks) over the aged tasks.
#   4. after:    the baseline again, once the cleanup has finished (the
#                table then holds what the runs left behind).
#
# Reports steps/s of each run, the ratio cleanup / baseline (target >= 0.8),
# how many steps the cleanup deleted while the measured run was going and
# how long the whole cleanup took. Private cluster (EmbeddedPostgres) in a
# temp dir, fsync and synchronous_commit on.
#
#   ruby bench/retention_bench.rb     # 1,000,000 finished steps, 20,000 new ones
#   RETENTION_FINISHED_STEPS=20000 RETENTION_NEW_STEPS=2000 RETENTION_WRITE=0 ruby bench/retention_bench.rb   # a quick look

require_relative "store_bench"

module Bench
  class Retention
    TARGET = 0.8

    def initialize(finished_steps:, new_steps:, batch_size:)
      @finished_steps = finished_steps
      @new_steps = new_steps
      @batch_size = batch_size
      @store = Bench::Store.new
    end

    def settings = @store.settings

    def run
      @store.start
      seed
      baseline = measure
      cleanup = measure_with_cleanup
      after = measure
      { "baseline" => baseline, "cleanup" => cleanup, "after" => after,
        "ratio" => (cleanup["steps_per_s"] / baseline["steps_per_s"]).round(3),
        "ratio_to_after" => (cleanup["steps_per_s"] / after["steps_per_s"]).round(3) }
    ensure
      @store.stop
    end

    private

    def conn = @store.conn

    def seed
      t = Bench.clock
      @store.create_tasks(conn, @finished_steps / Bench::Store::STEPS_PER_TASK)
      @store.reset_timings
      done = 0
      while (n = @store.round("bench-seed")).positive?
        done += n
      end
      raise "seeded #{done} of #{@finished_steps} steps" unless done == @finished_steps

      conn.exec("UPDATE tasker_tasks SET finished_at = finished_at - interval '30 days', " \
                "created_at = created_at - interval '30 days'")
      conn.exec("VACUUM ANALYZE")
      puts format("seeded %d finished steps in %.1f s", done, Bench.clock - t)
    end

    # store_bench's concurrent mode without its TRUNCATE: one connection
    # creates, this one drains until the new tasks are all done.
    def measure
      @store.reset_timings
      before = conn.exec("SELECT coalesce(max(id), 0) AS m FROM tasker_tasks").first["m"]
      t0 = Bench.clock
      creator = Thread.new do
        c = @store.connect
        begin
          @store.create_tasks(c, @new_steps / Bench::Store::STEPS_PER_TASK)
        ensure
          c.close
        end
      end
      done = 0
      loop do
        n = @store.round("bench-retention")
        done += n
        next if n.positive?
        break unless creator.alive?

        sleep 0.001
      end
      creator.value
      done += @store.round("bench-retention") while done < @new_steps
      seconds = Bench.clock - t0
      unfinished = conn.exec("SELECT count(*)::int AS n FROM tasker_tasks WHERE id > $1 AND state <> 'complete'",
                             [before]).first["n"]
      raise "#{unfinished} new tasks unfinished" unless unfinished.zero?

      { "steps" => done, "seconds" => seconds.round(3), "steps_per_s" => (done / seconds).round(1) }
    end

    def measure_with_cleanup
      progress = { "steps" => 0 }
      lock = Mutex.new
      t0 = Bench.clock
      cleaner = Thread.new do
        c = @store.connect
        begin
          TaskerCore::Retention.new(older_than: 7 * 86_400, batch_size: @batch_size).run(c) do |r|
            lock.synchronize { progress["steps"] = r.steps }
          end.tap { progress["cleanup_s"] = Bench.clock - t0 }
        ensure
          c.close
        end
      end
      result = measure
      deleted_during = lock.synchronize { progress["steps"] }
      total = cleaner.value
      raise "another cleaner held the lock" if total.nil?

      result.merge("deleted_steps_during_run" => deleted_during, "deleted_steps" => total.steps,
                   "cleanup_batches" => total.batches, "cleanup_s" => progress["cleanup_s"].round(3))
    end
  end
end

if $PROGRAM_NAME == __FILE__
  finished = Integer(ENV.fetch("RETENTION_FINISHED_STEPS", "1000000"))
  new_steps = Integer(ENV.fetch("RETENTION_NEW_STEPS", "20000"))
  batch = Integer(ENV.fetch("RETENTION_BATCH", TaskerCore::Retention::BATCH_SIZE.to_s))
  bench = Bench::Retention.new(finished_steps: finished, new_steps: new_steps, batch_size: batch)
  r = bench.run
  %w[baseline cleanup after].each do |k|
    puts format("%-8s %8.1f steps/s  (%d steps in %.2f s)%s", k, r[k]["steps_per_s"], r[k]["steps"], r[k]["seconds"],
                k == "cleanup" ? format("  cleanup deleted %d steps during the run, %d in all in %.1f s (%d batches)",
                                        r[k]["deleted_steps_during_run"], r[k]["deleted_steps"], r[k]["cleanup_s"],
                                        r[k]["cleanup_batches"]) : "")
  end
  puts format("ratio cleanup/baseline %.3f (target >= %.1f), cleanup/after %.3f", r["ratio"], Bench::Retention::TARGET,
              r["ratio_to_after"])
  unless ENV["RETENTION_WRITE"] == "0"
    rows = [Bench.row(label: "#{new_steps} new steps while #{finished} finished steps are deleted",
                      contender: "ours", metric: "throughput with cleanup / without", unit: "x",
                      samples: [r["ratio"]], runs: [r])]
    Bench.write_result("retention", parameters: { "finished_steps" => finished, "new_steps" => new_steps,
                                                  "batch_tasks" => batch, "postgresql_settings" => bench.settings },
                                    rows: rows,
                                    limits: [{ "label" => rows[0]["label"], "metric" => "throughput with cleanup / without",
                                               "contender" => "ours", "min" => Bench::Retention::TARGET }])
  end
end
