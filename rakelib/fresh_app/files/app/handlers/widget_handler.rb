# frozen_string_literal: true

# Each step writes a row through the app's model and holds its connection a
# little while, so more steps at once than the pool has connections must take
# turns (the worker's concurrency is above the pool size).
class WidgetHandler
  def call(task, _sequence, step)
    Widget.transaction do
      Widget.create!(name: "#{task.context['batch']}-#{step.name}")
      sleep 0.2
    end
    { "widgets" => Widget.where("name LIKE ?", "#{task.context['batch']}-%").count }
  end
end
