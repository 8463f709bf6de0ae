# frozen_string_literal: true

# A plain ActiveJob job on tasker_core (config.active_job.queue_adapter =
# :tasker_core): POST /orders enqueues one per order; a `tasker worker`
# runs it as the one step of an active_job/perform task. ActiveJob's own
# retry_on and discard_on apply; an error neither takes fails the job's step
# for good (tasker_core does not retry it).
class OrderReceiptJob < ApplicationJob
  # The mail server said "try later": ActiveJob enqueues the job again, up to 3 executions in all.
  class MailServerBusy < StandardError; end
  # Nothing to send a receipt for: dropped.
  class UnknownOrder < StandardError; end

  queue_as :default
  retry_on MailServerBusy, wait: 0, attempts: 3
  discard_on UnknownOrder

  # busy: how many executions find the mail server busy (for the app's spec).
  def perform(order_id, busy: 0)
    raise UnknownOrder, "no order #{order_id}" if order_id.negative?
    raise ArgumentError, "order ids start at 1" if order_id.zero?
    raise MailServerBusy, "mail server busy" if executions <= busy

    Receipt.create!(order_id: order_id, executions: executions, job_id: job_id)
  end
end
