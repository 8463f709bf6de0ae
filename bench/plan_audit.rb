# frozen_string_literal: true

# Lists the work that grows with the square of a call's size
# (bench/lib/plan_audit.rb) in a PostgreSQL log written with auto_explain
# (log_analyze on), as `E2E_PLANS=DIR bundle exec ruby bench/e2e_bench.rb`
# writes it.
#
#   ruby bench/plan_audit.rb tmp/plans/postgres.log [MIN_LOOPS] [ROWS_PER_LOOP] [DROPPED]

require_relative "lib/plan_audit"

log, *limits = ARGV
abort "usage: ruby bench/plan_audit.rb POSTGRES_LOG [MIN_LOOPS] [ROWS_PER_LOOP] [DROPPED]" unless log && File.file?(log)
min_loops, per_loop, dropped = limits.map { |v| Integer(v) }
found = PlanAudit.findings(File.read(log, encoding: "UTF-8", invalid: :replace),
                           **{ min_loops: min_loops, per_loop: per_loop, dropped: dropped }.compact)
puts "nothing found" if found.empty?
found.each { |f| printf("%-28s %9d rows at most, in %d plans: %s\n", f.what, f.most, f.plans, f.query[0, 70]) }
