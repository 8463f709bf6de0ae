# frozen_string_literal: true

# Reads plans printed by auto_explain with log_analyze on (text format, in
# a server log or as NOTICEs) and finds the work that grows with the square
# of a call's size: a plan node run once per row of another that returns
# many rows each time (a CTE, a materialised set or a whole index scanned
# again per row), and a join that compares many pairs of rows only to drop
# them (a nested loop's join filter). A node reached by key once per row
# (an index scan by id, an aggregate of one row's children) returns a few
# rows per loop and is not reported. Used by bench/plan_audit.rb and by the
# store's specs.
module PlanAudit
  # rows: a whole number, or with two decimals (an average per loop, PostgreSQL 18)
  NODE = /->\s+(?<node>[A-Z][A-Za-z ]+?)(?: on | using |\s+\().*actual rows=(?<rows>\d+(?:\.\d+)?) loops=(?<loops>\d+)/
  JOIN_FILTER = /Rows Removed by Join Filter: (?<removed>\d+)/
  Finding = Struct.new(:query, :what, :most, :plans, keyword_init: true)

  # The plan nodes in text that carry their actual rows and loops.
  def self.nodes(text) = text.each_line.count { |line| NODE.match?(line) }

  # Findings, the largest first: nodes run at least min_loops times
  # returning at least per_loop rows each time on average, and join filters
  # that dropped at least dropped rows.
  def self.findings(text, min_loops: 10, per_loop: 20, dropped: 1000)
    found = {}
    note = lambda do |query, what, n|
      f = found[[query, what]] ||= Finding.new(query: query, what: what, most: 0, plans: 0)
      f.plans += 1
      f.most = [f.most, n].max
    end
    text.split(/(?:LOG|NOTICE):  duration: /).each do |plan|
      query = plan[/Query Text:\s*(.*)/, 1].to_s.split.first(8).join(" ")
      plan.each_line do |line|
        if (m = NODE.match(line))
          rows = m[:rows].to_f
          loops = m[:loops].to_i
          note.(query, "#{m[:node]} rescanned", (rows * loops).round) if loops >= min_loops && rows >= per_loop
        elsif (m = JOIN_FILTER.match(line))
          note.(query, "join filter", m[:removed].to_i) if m[:removed].to_i >= dropped
        end
      end
    end
    found.values.sort_by { |f| -f.most }
  end
end
