# frozen_string_literal: true

class CreateReceipts < ActiveRecord::Migration[7.0]
  def change
    create_table :receipts do |t|
      t.integer :order_id, null: false
      t.integer :executions, null: false
      t.string :job_id, null: false
      t.timestamps
    end
  end
end
