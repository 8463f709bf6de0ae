# frozen_string_literal: true

module TaskerCore
  module Internal
    # The shape of an orchestrator process's Ruby threads beside the native
    # loop (retention, recurring tasks): #start runs the includer's private
    # #run in a thread named #thread_name; #run sleeps with #pause, which
    # #stop cuts short; #stop joins the thread. Call init_background_thread
    # from initialize.
    module BackgroundThread
      def start
        @thread ||= Thread.new do
          Thread.current.name = thread_name
          run
        end
        self
      end

      def stop
        return unless @thread

        @lock.synchronize do
          @stopping = true
          @wake.signal
        end
        @thread.join
        @thread = nil
        @stopping = false
      end

      def running? = !@thread.nil?

      private

      def init_background_thread
        @lock = Mutex.new
        @wake = ConditionVariable.new
        @stopping = false
        @thread = nil
      end

      # Sleeps up to seconds, or less when #stop is called; -> true when stopping.
      def pause(seconds)
        @lock.synchronize do
          @wake.wait(@lock, seconds) if seconds.positive? && !@stopping
          @stopping
        end
      end

      def stopping? = @lock.synchronize { @stopping }
    end
  end
end
