# frozen_string_literal: true

module TaskerCore
  module Worker
    # One step this worker accepted. state: :queued, :running, :done or
    # :timed_out, changed under the Executor's mutex.
    Job = Struct.new(:batch, :index, :step, :timeout_s, :state, :thread, :started_at, :deadline,
                     :grace_deadline, keyword_init: true)
    # limits: the orchestrator's limits for this batch's results
    # ({max_result_bytes:, max_message_bytes:, max_payload_depth:}).
    BatchState = Struct.new(:id, :steps, :statuses, :reported, :limits, keyword_init: true)
    # One message for the result socket. kind: a status, :completion or
    # :refusal; job: the step a partial reports; error: a failed step's error
    # object; refused: the tokens of the steps a refusal answers. A step's
    # result has no frames but its packed entry (Protocol.pack_entry) and
    # the largest result body its batch's orchestrator takes (limit, nil:
    # none): results next to each other in the outbox leave as one message.
    Outgoing = Struct.new(:frames, :kind, :job, :error, :refused, :entry, :limit, keyword_init: true)
  end
end
