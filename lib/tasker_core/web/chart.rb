# frozen_string_literal: true

module TaskerCore
  class Web
    # Steps per second over the last hour as an SVG area chart, drawn on the
    # server (numbers only: nothing from task data goes into it).
    module Chart
      W = 720
      H = 160
      LEFT = 44
      BOTTOM = 20

      module_function

      # values: per-second rates, oldest first, one per bucket of bucket_s seconds.
      def throughput_svg(values, bucket_s:)
        max = nice_max(values.max.to_f)
        plot_w = W - LEFT - 8
        plot_h = H - BOTTOM - 8
        step = values.size > 1 ? plot_w.fdiv(values.size - 1) : plot_w
        pts = values.each_with_index.map do |v, i|
          [(LEFT + i * step).round(1), (8 + plot_h - (v / max * plot_h)).round(1)]
        end
        line = pts.map { |x, y| "#{x},#{y}" }.join(" ")
        area = "#{LEFT},#{8 + plot_h} #{line} #{pts.last&.first || LEFT},#{8 + plot_h}"
        minutes = values.size * bucket_s / 60
        grid = [0, 0.5, 1].map do |f|
          y = (8 + plot_h - f * plot_h).round(1)
          %(<line x1="#{LEFT}" y1="#{y}" x2="#{W - 8}" y2="#{y}" stroke="#e5e7eb"/>) +
            %(<text x="#{LEFT - 6}" y="#{y + 4}" font-size="11" text-anchor="end" fill="#6b7280">#{label(max * f)}</text>)
        end.join
        %(<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="throughput-chart" width="#{W}" height="#{H}" ) +
          %(viewBox="0 0 #{W} #{H}" role="img" aria-label="steps completed per second, last #{minutes} minutes">) +
          grid + %(<polygon points="#{area}" fill="#bbf7d0"/>) +
          %(<polyline points="#{line}" fill="none" stroke="#16a34a" stroke-width="2"/>) +
          %(<text x="#{LEFT}" y="#{H - 4}" font-size="11" fill="#6b7280">#{minutes} min ago</text>) +
          %(<text x="#{W - 8}" y="#{H - 4}" font-size="11" text-anchor="end" fill="#6b7280">now</text></svg>)
      end

      def nice_max(max)
        return 1.0 if max <= 0

        mag = 10**Math.log10(max).floor
        [1, 2, 5, 10].map { |m| m * mag.to_f }.find { |c| c >= max }
      end

      def label(v) = v >= 10 || v.zero? ? v.round.to_s : v.round(2).to_s
    end
  end
end
