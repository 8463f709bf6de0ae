# frozen_string_literal: true

module TaskerCore
  class CLI
    # Plain-text tables for the commands' human output.
    module Table
      module_function

      # headers: [String], rows: [[Object]] -> String (no trailing newline)
      def render(headers, rows)
        cells = [headers, *rows].map { |r| r.map { |c| c.nil? ? "-" : c.to_s } }
        widths = headers.each_index.map { |i| cells.map { |r| r[i].size }.max }
        lines = cells.map { |r| r.each_with_index.map { |c, i| c.ljust(widths[i]) }.join("  ").rstrip }
        lines.insert(1, widths.map { |w| "-" * w }.join("  "))
        lines.join("\n")
      end
    end
  end
end
