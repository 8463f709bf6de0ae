# frozen_string_literal: true

module TaskerCore
  class CLI
    # Progress of long work: done / total, percentage, rate and ETA. On a
    # terminal a bar redrawn in place (at most every 0.1 s); otherwise a plain
    # line every `interval` seconds (and one at the end), which reads well in
    # logs and CI. The rate is measured from the moment the progress appears,
    # to the fraction of a second.
    class Progress
      BAR_WIDTH = 30
      REDRAW_S = 0.1

      # start: work already done when the progress appears (left out of the rate).
      def initialize(title:, total:, io: $stderr, tty: io.respond_to?(:tty?) && io.tty?, interval: 2.0, unit: "", start: 0,
                     clock: -> { Process.clock_gettime(Process::CLOCK_MONOTONIC) })
        @title = title
        @total = total
        @io = io
        @tty = tty
        @interval = tty ? REDRAW_S : interval
        @unit = unit
        @clock = clock
        @done = @start = [start, total].min
        @started = now
        @last_line = @started
        draw if tty
      end

      attr_reader :done

      def update(done)
        @done = [done, @total].min
        draw if now - @last_line >= @interval
      end

      def finish
        @done = @total if @done > @total
        draw if @tty || @printed != @done
        @io.puts if @tty
        @io.flush
      end

      # Work per second since the progress appeared.
      def rate
        elapsed = now - @started
        elapsed.positive? ? (@done - @start) / elapsed : 0.0
      end

      private

      def draw
        @last_line = now
        @printed = @done
        if @tty
          @io.print "\r#{bar} #{text}\e[K"
        else
          @io.puts text
        end
        @io.flush
      end

      def text
        pct = @total.positive? ? (100.0 * @done / @total).round : 100
        eta = rate.positive? && @done < @total ? ", ETA #{format_duration((@total - @done) / rate)}" : ""
        "#{@title}: #{@done}/#{@total} (#{pct}%), #{format('%.1f', rate)}#{@unit}/s#{eta}"
      end

      def bar
        filled = @total.positive? ? (BAR_WIDTH * @done / @total) : BAR_WIDTH
        "[#{'=' * filled}#{' ' * (BAR_WIDTH - filled)}]"
      end

      def format_duration(seconds)
        seconds = seconds.round
        seconds >= 60 ? format("%dm%02ds", seconds / 60, seconds % 60) : "#{seconds}s"
      end

      def now = @clock.call
    end
  end
end
