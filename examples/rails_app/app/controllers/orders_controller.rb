# frozen_string_literal: true

# POST /orders creates a fulfil_order task (one SQL call: this process opens
# no socket) and enqueues an OrderReceiptJob (ActiveJob, a task of its own);
# GET /orders/:id shows the task and its steps.
class OrdersController < ApplicationController
  def create
    order = params.require(:order).permit(:order_id, :customer_email, items: %i[sku quantity unit_price_cents])
    context = order.to_h.merge("order_id" => Integer(order[:order_id]), "items" => items(order))
    task_id = TaskerCore.create_task(name: "fulfil_order", namespace: "shop", context: context,
                                     identity_key: "order-#{context['order_id']}")
    OrderReceiptJob.perform_later(context["order_id"])
    render json: { task_id: task_id }, status: :created
  rescue TaskerCore::ValidationError, ArgumentError => e
    render json: { error: e.message }, status: :unprocessable_entity
  end

  def show
    task = TaskerCore.task(params[:id])
    return head(:not_found) unless task

    render json: task.slice(:id, :name, :status, :context).merge(
      steps: task[:steps].map { |s| s.slice(:name, :state, :attempts, :output, :error) }
    )
  end

  private

  def items(order)
    Array(order[:items]).map do |i|
      { "sku" => i[:sku].to_s, "quantity" => Integer(i[:quantity]), "unit_price_cents" => Integer(i[:unit_price_cents]) }
    end
  end
end
