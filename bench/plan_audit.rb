# frozen_string_literal: true

# Reads a PostgreSQL log written with auto_explain (log_analyze on, as
# `E2E_PLANS=DIR bundle exec ruby bench/e2e_bench.rb` writes it) and lists
# the plan nodes run once per row of another node: rows x loops at least
# MIN_ROWS (default 200) in loops at least MIN_LOOPS (10). A node of a
# table reached by id (an index scan run once per result) is expected
# there; a CTE scan, a materialised or sorted set, or a function scan
# rescanned per row is a cost that grows with the square of a call's size.
#
#   ruby bench/plan_audit.rb tmp/plans/postgres.log [MIN_ROWS] [MIN_LOOPS]

log, min_rows, min_loops = ARGV
abort "usage: ruby bench/plan_audit.rb POSTGRES_LOG [MIN_ROWS] [MIN_LOOPS]" unless log && File.file?(log)
min_rows = Integer(min_rows || 200)
min_loops = Integer(min_loops || 10)

RESCANNED = ["CTE Scan", "Materialize", "Function Scan", "Subquery Scan", "Sort", "Hash", "HashAggregate",
             "Aggregate", "Seq Scan"].freeze
NODE = /->\s+(?<node>[A-Z][A-Za-z ]+?)(?: on | using |\s+\().*actual rows=(?<rows>\d+) loops=(?<loops>\d+)/

found = Hash.new { |h, k| h[k] = { plans: 0, most: 0 } }
File.read(log, encoding: "UTF-8", invalid: :replace).split(/^\S.* LOG:  duration: /).each do |plan|
  query = plan[/Query Text:\s*(.*)/, 1].to_s.split.first(8).join(" ")
  plan.each_line do |line|
    m = NODE.match(line) or next
    loops = m[:loops].to_i
    total = m[:rows].to_i * loops
    next unless loops >= min_loops && total >= min_rows

    key = [query[0, 70], m[:node], RESCANNED.include?(m[:node]) ? "rescanned per row" : "by key per row"]
    found[key][:plans] += 1
    found[key][:most] = [found[key][:most], total].max
  end
end

if found.empty?
  puts "no node run #{min_loops} times or more over #{min_rows} rows or more"
else
  found.sort_by { |_, v| -v[:most] }.each do |(query, node, kind), v|
    printf("%-18s %-20s %9d rows x loops at most, in %d plans: %s\n", kind, node, v[:most], v[:plans], query)
  end
end
