# frozen_string_literal: true

module TaskerCore
  class CLI
    # Progress of long work: a ruby-progressbar bar (done / total, rate, ETA)
    # when io is a terminal, otherwise a plain line every `interval` seconds
    # (and one at the end), which reads well in logs and CI.
    class Progress
      def initialize(title:, total:, io: $stderr, tty: io.respond_to?(:tty?) && io.tty?, interval: 2.0, unit: "")
        @title = title
        @total = total
        @io = io
        @interval = interval
        @unit = unit
        @done = 0
        @started = now
        @last_line = @started
        if tty
          require "ruby-progressbar"
          @bar = ProgressBar.create(title: title, total: total, output: io,
                                    format: "%t: %c/%C |%B| %R#{unit}/s %E", throttle_rate: 0.1)
        end
      end

      attr_reader :done

      def update(done)
        @done = [done, @total].min
        if @bar
          @bar.progress = @done
        elsif now - @last_line >= @interval
          line
        end
      end

      def finish
        @done = @total if @done > @total
        if @bar
          @bar.progress = @done
          @bar.stop
        elsif @printed != @done
          line
        end
      end

      def rate
        elapsed = now - @started
        elapsed.positive? ? @done / elapsed : 0.0
      end

      private

      def line
        @last_line = now
        @printed = @done
        pct = @total.positive? ? (100.0 * @done / @total).round : 100
        eta = rate.positive? && @done < @total ? ", ETA #{format_duration((@total - @done) / rate)}" : ""
        @io.puts "#{@title}: #{@done}/#{@total} (#{pct}%), #{rate.round(1)}#{@unit}/s#{eta}"
        @io.flush
      end

      def format_duration(seconds)
        seconds = seconds.round
        seconds >= 60 ? format("%dm%02ds", seconds / 60, seconds % 60) : "#{seconds}s"
      end

      def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
end
