# frozen_string_literal: true

# One client of the batched-SQL floor: claims 100 pending jobs with
# FOR UPDATE SKIP LOCKED and completes them with = ANY(ids), each statement
# its own (synchronously committed) transaction, no messaging at all.
# Protocol with bench/lib/e2e.rb: prints "ready"; starts on "go"; after
# "drain", stops at the first empty claim and prints "done"; exits at the
# end of stdin.
#
#   ruby bench/e2e/sql_floor_client.rb DATABASE_URL

$LOAD_PATH.unshift File.expand_path("../../lib", __dir__)
require "tasker_core"

CLAIM = <<~SQL
  WITH c AS (SELECT id FROM bench_jobs WHERE state = 'pending' ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)
  UPDATE bench_jobs j SET state = 'running', claimed_at = clock_timestamp() FROM c WHERE j.id = c.id
  RETURNING j.id
SQL
COMPLETE = "UPDATE bench_jobs SET state = 'complete', completed_at = clock_timestamp() WHERE id = ANY($1::bigint[])"

$stdout.sync = true
conn = TaskerCore::Store::Connection.new(ARGV.fetch(0), connect_timeout: 10)
puts "ready"
$stdin.gets # "go"
draining = false
loop do
  ids = conn.exec(CLAIM).map { |r| r["id"] }
  if ids.empty?
    draining ||= IO.select([$stdin], nil, nil, 0) && $stdin.gets&.strip == "drain"
    break if draining

    sleep 0.001
    next
  end
  conn.exec(COMPLETE, [ids])
end
puts "done"
$stdin.read
conn.close
